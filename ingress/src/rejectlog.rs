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
