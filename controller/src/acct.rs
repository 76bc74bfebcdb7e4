//! Accounting files. Every replica writes the same rows: they come from the applied log
//! (`acct` column family), in log order. A position file beside each CSV records how far it
//! got and how long the file was then; after a crash the CSV is cut back to that length and
//! the export resumes, so that no row is lost or written twice.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rocksdb::{Direction, IteratorMode};
use sluice_common::acct::DEFAULT_FIELDS;
use sluice_common::policy::{AcctFile, RecordType};

use crate::node::Controller;
use crate::queue::state::AcctEvent;
use crate::raft::store::CF_ACCT;

pub fn format_time(ms: u64) -> String {
    use chrono::TimeZone;
    match chrono::Local.timestamp_millis_opt(ms as i64) {
        chrono::LocalResult::Single(t) => t.format("%Y-%m-%d %H:%M:%S%z").to_string(),
        _ => String::new(),
    }
}

fn csv(v: &str) -> String {
    if v.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", v.replace('"', "\"\""))
    } else {
        v.to_string()
    }
}

/// The value of one column for an event.
pub fn field(ev: &AcctEvent, name: &str) -> String {
    let status = if ev.enhanced.is_empty() {
        match ev.kind.as_str() {
            "d" => "2.0.0".to_string(),
            "b" => "5.0.0".to_string(),
            "t" => "4.0.0".to_string(),
            _ => String::new(),
        }
    } else {
        ev.enhanced.clone()
    };
    match name {
        "type" => ev.kind.clone(),
        "timeLogged" => format_time(ev.time_ms),
        "timeQueued" => format_time(ev.queued_ms),
        "orig" => ev.orig.clone(),
        "rcpt" => ev.rcpt.clone(),
        "orcpt" => ev.orcpt.clone(),
        "dsnAction" => match ev.kind.as_str() {
            "d" => "relayed",
            "b" => "failed",
            "t" => "delayed",
            _ => "",
        }
        .into(),
        "dsnStatus" if ev.kind == "r" => String::new(),
        "dsnStatus" => format!(
            "{status} ({})",
            if ev.category.is_empty() {
                "success"
            } else {
                &ev.category
            }
        ),
        "dsnDiag" if ev.code > 0 => format!("smtp;{} {}", ev.code, ev.diag),
        "dsnDiag" => ev.diag.clone(),
        "dsnMta" if !ev.mx.is_empty() => format!("{} ({})", ev.mx, ev.mx_ip),
        "dsnMta" => String::new(),
        "bounceCat" => ev.category.clone(),
        "srcType" => "smtp".into(),
        "srcMta" => ev.src_mta.clone(),
        "srcIp" => ev.client_ip.clone(),
        "dlvType" if ev.kind == "r" => String::new(),
        "dlvType" => "smtp".into(),
        "dlvSourceIp" => ev.source_ip.clone(),
        "dlvDestinationIp" => ev.mx_ip.clone(),
        "dlvEsmtpAvailable" if ev.kind == "r" || ev.mx.is_empty() => String::new(),
        "dlvEsmtpAvailable" => if ev.esmtp { "yes" } else { "no" }.into(),
        "dlvSize" => {
            if ev.kind == "r" {
                String::new()
            } else {
                ev.size.to_string()
            }
        }
        "dlvMxHostname" => ev.mx.clone(),
        "dlvTlsProtocol" => ev.tls.split(' ').next().unwrap_or("").to_string(),
        "dlvTlsCipher" => ev
            .tls
            .split_once(' ')
            .map(|(_, c)| c.to_string())
            .unwrap_or_default(),
        "vmta" => ev.vmta.clone(),
        "jobId" => ev.job_id.clone(),
        "envId" | "envid" => ev.envid.clone(),
        "queue" => format!("{}/{}", ev.queue, ev.vmta),
        "vmtaPool" => String::new(),
        "msgId" => format!("{:016x}", ev.msg),
        _ => String::new(),
    }
}

/// The columns of a file: `record-fields` selections (with `*` and `!field`) or the defaults.
pub fn columns(file: &AcctFile) -> Vec<String> {
    let mut cols: Vec<String> = Vec::new();
    if file.record_fields.is_empty() {
        return DEFAULT_FIELDS.iter().map(|s| s.to_string()).collect();
    }
    for rf in &file.record_fields {
        let mut these: Vec<String> = Vec::new();
        for f in &rf.fields {
            if f == "*" {
                these.extend(DEFAULT_FIELDS.iter().map(|s| s.to_string()));
            } else if let Some(x) = f.strip_prefix('!') {
                these.retain(|c| c != x);
            } else {
                these.push(f.clone());
            }
        }
        for c in these {
            if !cols.contains(&c) {
                cols.push(c);
            }
        }
    }
    if !cols.iter().any(|c| c == "type") {
        cols.insert(0, "type".into());
    }
    cols
}

struct Writer {
    path: PathBuf,
    pos_path: PathBuf,
    records: Vec<String>,
    cols: Vec<String>,
    max_size: Option<u64>,
}

impl Writer {
    fn new(file: &AcctFile, data_dir: &Path) -> Option<Writer> {
        if file.target.starts_with('|') {
            tracing::warn!(target = %file.target, "accounting pipes are not written yet");
            return None;
        }
        let p = PathBuf::from(&file.target);
        let path = if p.is_absolute() { p } else { data_dir.join(p) };
        let records = match &file.settings.records {
            Some(l) => l.0.iter().map(|r| r.code().to_string()).collect(),
            None => RecordType::ALL
                .iter()
                .map(|r| r.code().to_string())
                .collect(),
        };
        let max_size = file.settings.max_size.and_then(|s| s.0);
        Some(Writer {
            pos_path: path.with_extension("pos"),
            path,
            records,
            cols: columns(file),
            max_size,
        })
    }

    /// (last exported seq, file length then).
    fn position(&self) -> (u64, u64) {
        std::fs::read_to_string(&self.pos_path)
            .ok()
            .and_then(|s| {
                let mut it = s.split_whitespace();
                Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
            })
            .unwrap_or((0, 0))
    }

    fn export(&self, db: &rocksdb::DB) -> std::io::Result<()> {
        let (done, len) = self.position();
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&self.path)?;
        // Cut off whatever a crash left after the last recorded position.
        if f.metadata()?.len() != len {
            f.set_len(len)?;
        }
        let mut out = Vec::new();
        if len == 0 {
            out.extend_from_slice(self.cols.join(",").as_bytes());
            out.push(b'\n');
        }
        let cf = db.cf_handle(CF_ACCT).unwrap();
        let mut last = done;
        for (k, v) in db
            .iterator_cf(
                cf,
                IteratorMode::From(&(done + 1).to_be_bytes(), Direction::Forward),
            )
            .flatten()
        {
            let seq = u64::from_be_bytes(k[..8].try_into().unwrap());
            last = seq;
            let Ok(ev) = bincode::deserialize::<AcctEvent>(&v) else {
                continue;
            };
            if !self.records.contains(&ev.kind) {
                continue;
            }
            let row: Vec<String> = self.cols.iter().map(|c| csv(&field(&ev, c))).collect();
            out.extend_from_slice(row.join(",").as_bytes());
            out.push(b'\n');
            if out.len() > 4 << 20 {
                break;
            }
        }
        if last == done {
            return Ok(());
        }
        use std::io::Seek;
        f.seek(std::io::SeekFrom::Start(len))?;
        f.write_all(&out)?;
        f.sync_data()?;
        let new_len = len + out.len() as u64;
        let tmp = self.pos_path.with_extension("pos.tmp");
        std::fs::write(&tmp, format!("{last} {new_len}\n"))?;
        std::fs::rename(&tmp, &self.pos_path)?;
        if self.max_size.is_some_and(|m| new_len >= m) {
            let rotated = self.path.with_extension(format!(
                "{}.csv",
                chrono::Local::now().format("%Y%m%d%H%M%S")
            ));
            std::fs::rename(&self.path, rotated)?;
            std::fs::write(&tmp, format!("{last} 0\n"))?;
            std::fs::rename(&tmp, &self.pos_path)?;
        }
        Ok(())
    }
}

/// Exports new accounting rows to the policy's acct-files, twice a second.
pub async fn export_loop(ctl: Arc<Controller>) {
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let policy = ctl.policy().policy.clone();
        let data_dir = ctl.settings.data_dir.clone();
        let db = ctl.sm.db.clone();
        let res = tokio::task::spawn_blocking(move || {
            for f in &policy.acct_files {
                if let Some(w) = Writer::new(f, &data_dir)
                    && let Err(e) = w.export(&db)
                {
                    tracing::error!(file = %w.path.display(), "accounting export failed: {e}");
                }
            }
        })
        .await;
        if res.is_err() {
            tracing::error!("accounting export task panicked");
        }
    }
}
