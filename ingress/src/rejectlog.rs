//! The reject log: every refused connection (`c`) and recipient (`r`), with the reason, in a
//! file that is rotated to `PATH.1` when it reaches `max-size`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Mutex;

pub struct RejectLog {
    path: Option<PathBuf>,
    records: Vec<char>,
    max_size: u64,
    file: Mutex<Option<std::fs::File>>,
}

impl RejectLog {
    pub fn new(path: Option<PathBuf>, records: Vec<char>, max_size: u64) -> Self {
        RejectLog {
            path,
            records,
            max_size,
            file: Mutex::new(None),
        }
    }

    pub fn write(&self, peer: SocketAddr, kind: char, reason: &str) {
        tracing::debug!(%peer, kind = %kind, reason, "rejected");
        let Some(path) = &self.path else { return };
        if !self.records.is_empty() && !self.records.contains(&kind) {
            return;
        }
        let line = format!(
            "{},{},{},\"{}\"\n",
            chrono::Local::now().format("%Y-%m-%d %H:%M:%S%z"),
            kind,
            peer.ip(),
            reason.replace('"', "'")
        );
        let mut f = self.file.lock().unwrap();
        if let Some(file) = f.as_ref()
            && file
                .metadata()
                .map(|m| m.len() >= self.max_size)
                .unwrap_or(false)
        {
            *f = None;
            let _ = std::fs::rename(path, path.with_extension("1"));
        }
        if f.is_none() {
            *f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .ok();
        }
        if let Some(file) = f.as_mut() {
            let _ = file.write_all(line.as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_choose_what_is_written_and_max_size_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reject.log");
        let peer: SocketAddr = "127.0.0.9:5000".parse().unwrap();
        // `records c`: refused connections only; rotated past 200 bytes.
        let log = RejectLog::new(Some(path.clone()), vec!['c'], 200);
        log.write(peer, 'r', "recipient refused");
        assert!(!path.exists(), "an `r` record was written");
        for n in 0..10 {
            log.write(peer, 'c', &format!("connection {n} refused"));
        }
        let now = std::fs::read_to_string(&path).unwrap();
        let old = std::fs::read_to_string(path.with_extension("1")).unwrap();
        assert!(now.len() < 200 + 80, "{now}");
        assert!(old.contains(",c,127.0.0.9,"), "{old}");
        assert!(now.contains("connection 9 refused"), "{now}");
    }
}
