//! Accounting files. Every replica writes the same rows: they come from the applied log, in
//! log order, and times are written in one zone for the whole cluster (UTC unless the
//! `[accounting] time_zone` setting names another). A position file beside each CSV records
//! how far it got and how long the file was then; after a crash the CSV is cut back to that
//! length and the export resumes, so that no row is lost or written twice.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{FixedOffset, TimeZone};
use sluice_common::acct::{DEFAULT_FIELDS, FEEDBACK_FIELDS};
use sluice_common::policy::value::MaybeNever;
use sluice_common::policy::{AcctFile, RecordType};

use crate::node::Controller;
use crate::queue::acct_event::{AcctEvent, ReportFields};
use crate::queue::read;

/// The zone accounting times are written in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Zone {
    Fixed(FixedOffset),
    /// The host's zone: replicas in different zones then write different files.
    Local,
}

impl Zone {
    /// `UTC`, a fixed offset such as `+02:00` or `-0500`, or `local`.
    pub fn parse(s: &str) -> Result<Zone, String> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("utc") || t == "Z" {
            return Ok(Zone::Fixed(FixedOffset::east_opt(0).expect("zero offset")));
        }
        if t.eq_ignore_ascii_case("local") {
            return Ok(Zone::Local);
        }
        let bad = || format!("time zone `{s}`: expected UTC, local, or an offset such as +02:00");
        let (sign, rest) = match t.as_bytes().first() {
            Some(b'+') => (1, &t[1..]),
            Some(b'-') => (-1, &t[1..]),
            _ => return Err(bad()),
        };
        let digits: String = rest.chars().filter(|c| *c != ':').collect();
        if digits.len() != 4 || !digits.chars().all(|c| c.is_ascii_digit()) {
            return Err(bad());
        }
        let h: i32 = digits[..2].parse().map_err(|_| bad())?;
        let m: i32 = digits[2..].parse().map_err(|_| bad())?;
        FixedOffset::east_opt(sign * (h * 3600 + m * 60))
            .map(Zone::Fixed)
            .ok_or_else(bad)
    }

    pub fn format(&self, ms: u64) -> String {
        const F: &str = "%Y-%m-%d %H:%M:%S%z";
        let t = match self {
            Zone::Fixed(z) => z
                .timestamp_millis_opt(ms as i64)
                .single()
                .map(|t| t.format(F).to_string()),
            Zone::Local => chrono::Local
                .timestamp_millis_opt(ms as i64)
                .single()
                .map(|t| t.format(F).to_string()),
        };
        t.unwrap_or_default()
    }
}

impl Default for Zone {
    fn default() -> Self {
        Zone::parse("UTC").expect("UTC parses")
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
pub fn field(ev: &AcctEvent, name: &str, zone: &Zone) -> String {
    use RecordType::*;
    let received = ev.kind == Received;
    let none = ReportFields::default();
    let report = ev.report.as_deref().unwrap_or(&none);
    let status = if ev.enhanced.is_empty() {
        match ev.kind {
            Delivery => "2.0.0".to_string(),
            Bounce | RemoteBounce => "5.0.0".to_string(),
            Transient | TransientQueue => "4.0.0".to_string(),
            _ => String::new(),
        }
    } else {
        ev.enhanced.clone()
    };
    match name {
        "type" => ev.kind.code().to_string(),
        "timeLogged" => zone.format(ev.time_ms),
        "timeQueued" | "timeImprinted" => zone.format(ev.queued_ms),
        "orig" => ev.orig.clone(),
        "rcpt" => ev.rcpt.clone(),
        "orcpt" => ev.orcpt.clone(),
        "dsnAction" if ev.kind == RemoteStatus => report.action.clone(),
        "dsnAction" => match ev.kind {
            Delivery => "relayed",
            Bounce | RemoteBounce => "failed",
            Transient | TransientQueue => "delayed",
            _ => "",
        }
        .into(),
        "dsnStatus" if received || ev.kind == Feedback => String::new(),
        "dsnStatus" if ev.kind == RemoteStatus => status,
        "dsnStatus" => format!(
            "{status} ({})",
            if ev.category.is_empty() {
                "success"
            } else {
                &ev.category
            }
        ),
        // A diagnostic that quotes the reply already starts with its code.
        "dsnDiag" if ev.code > 0 && ev.diag.starts_with(&ev.code.to_string()) => {
            format!("smtp;{}", ev.diag)
        }
        "dsnDiag" if ev.code > 0 => format!("smtp;{} {}", ev.code, ev.diag),
        "dsnDiag" => ev.diag.clone(),
        "dsnMta" if !ev.mx.is_empty() => format!("{} ({})", ev.mx, ev.mx_ip),
        "dsnMta" => String::new(),
        "bounceCat" => ev.category.clone(),
        "srcType" => "smtp".into(),
        "srcMta" => ev.src_mta.clone(),
        "srcIp" => ev.client_ip.clone(),
        "dlvType" if received => String::new(),
        "dlvType" => "smtp".into(),
        "dlvSourceIp" => ev.source_ip.clone(),
        "dlvDestinationIp" => ev.mx_ip.clone(),
        "dlvEsmtpAvailable" if received || ev.mx.is_empty() => String::new(),
        "dlvEsmtpAvailable" => if ev.esmtp { "yes" } else { "no" }.into(),
        "dlvSize" => {
            if received {
                String::new()
            } else {
                ev.size.to_string()
            }
        }
        "dlvMxHostname" => ev.mx.clone(),
        "dlvTlsProtocol" => ev.tls_version.clone(),
        "dlvTlsCipher" => ev.tls_cipher.clone(),
        "vmta" => ev.vmta.clone(),
        "jobId" => ev.job_id.clone(),
        "envId" | "envid" => ev.envid.clone(),
        "queue" => format!("{}/{}", ev.queue, ev.vmta),
        "vmtaPool" => ev.vmta_pool.clone(),
        "msgId" if ev.msg == 0 => String::new(),
        "msgId" => format!("{:016x}", ev.msg),
        "feedbackType" => report.feedback_type.clone(),
        "format" => report.format.clone(),
        "userAgent" => report.user_agent.clone(),
        "reportingMta" | "dsnReportingMta" => report.reporting_mta.clone(),
        "reportedDomain" => report.reported_domain.clone(),
        "origIp" => report.orig_ip.clone(),
        "arrivalDate" if report.arrival_ms > 0 => zone.format(report.arrival_ms),
        _ => match name.strip_prefix("header_") {
            Some(h) => ev
                .headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(h))
                .map(|(_, v)| v.clone())
                .unwrap_or_default(),
            None => String::new(),
        },
    }
}

/// The columns of a file: `record-fields` selections (with `*` and `!field`) or the defaults.
pub fn columns(file: &AcctFile) -> Vec<String> {
    let mut cols: Vec<String> = Vec::new();
    if file.record_fields.is_empty() {
        let mut cols: Vec<String> = DEFAULT_FIELDS.iter().map(|s| s.to_string()).collect();
        // A file whose `records` name `f` has the feedback columns too, as in PowerMTA. A file
        // without `records` keeps the default header it has always had.
        let feedback = file
            .settings
            .records
            .as_ref()
            .is_some_and(|l| l.0.contains(&RecordType::Feedback));
        if feedback {
            cols.extend(FEEDBACK_FIELDS.iter().map(|s| s.to_string()));
        }
        return cols;
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

/// Where rows of one `<acct-file>` go, and how far they got: `pos` holds the last exported
/// row's seq (and, for files, the file's length and start time then).
enum Target {
    File(PathBuf),
    /// `|program`: rows go to the program's standard input; it is restarted if it exits.
    Pipe(String),
}

/// A running pipe program and the last row written to it.
struct Pipe {
    child: std::process::Child,
    sent: u64,
}

/// Running pipe programs, by command line.
#[derive(Default)]
pub struct Pipes(std::collections::HashMap<String, Pipe>);

/// Bytes written to a pipe that its reader has not read yet.
fn unread(stdin: &std::process::ChildStdin) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int through the pointer, which is valid for that write.
    if unsafe { libc::ioctl(stdin.as_raw_fd(), libc::FIONREAD, &mut n) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n.max(0) as usize)
}

struct Writer {
    target: Target,
    pos_path: PathBuf,
    records: Vec<RecordType>,
    zone: Zone,
    /// Column names as written in the header line.
    cols: Vec<String>,
    /// What each column is computed from (a field name, or `header_X`).
    sources: Vec<String>,
    max_size: Option<u64>,
    move_interval: Option<Duration>,
    delete_after: Option<Duration>,
}

/// (last exported seq, file length then, file start time in ms).
#[derive(Clone, Copy, Default)]
struct Position {
    seq: u64,
    len: u64,
    started_ms: u64,
}

impl Writer {
    fn new(file: &AcctFile, data_dir: &Path, zone: Zone) -> Writer {
        let (target, pos_path) = match file.target.strip_prefix('|') {
            Some(cmd) => {
                let name: String = cmd
                    .chars()
                    .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                    .take(60)
                    .collect();
                let h = cmd.bytes().fold(0xcbf29ce484222325u64, |h, b| {
                    (h ^ b as u64).wrapping_mul(0x100000001b3)
                });
                (
                    Target::Pipe(cmd.trim().to_string()),
                    data_dir.join(format!("acct-pipes/{name}-{h:016x}.pos")),
                )
            }
            None => {
                let p = PathBuf::from(&file.target);
                let path = if p.is_absolute() { p } else { data_dir.join(p) };
                (Target::File(path.clone()), path.with_extension("pos"))
            }
        };
        let records = match &file.settings.records {
            Some(l) => l.0.clone(),
            None => RecordType::ALL.to_vec(),
        };
        let cols = columns(file);
        let sources = cols
            .iter()
            .map(|c| {
                match file
                    .header_columns
                    .iter()
                    .find(|(_, col)| col.eq_ignore_ascii_case(c))
                {
                    Some((h, _)) => format!("header_{h}"),
                    None => c.clone(),
                }
            })
            .collect();
        Writer {
            target,
            pos_path,
            records,
            zone,
            cols,
            sources,
            max_size: file.settings.max_size.and_then(|s| s.0),
            move_interval: file.settings.move_interval.map(|d| d.0),
            delete_after: match file.settings.delete_after {
                Some(MaybeNever::After(d)) => Some(d.0),
                _ => None,
            },
        }
    }

    fn name(&self) -> String {
        match &self.target {
            Target::File(p) => p.display().to_string(),
            Target::Pipe(c) => format!("|{c}"),
        }
    }

    fn position(&self) -> Position {
        std::fs::read_to_string(&self.pos_path)
            .ok()
            .and_then(|s| {
                let mut it = s.split_whitespace().map(|x| x.parse::<u64>().ok());
                Some(Position {
                    seq: it.next()??,
                    len: it.next()??,
                    started_ms: it.next().flatten().unwrap_or(0),
                })
            })
            .unwrap_or_default()
    }

    fn save_position(&self, p: Position) -> std::io::Result<()> {
        if let Some(dir) = self.pos_path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = self.pos_path.with_extension("pos.tmp");
        std::fs::write(&tmp, format!("{} {} {}\n", p.seq, p.len, p.started_ms))?;
        std::fs::rename(&tmp, &self.pos_path)
    }

    /// CSV rows after `done`, up to about 4 MB; returns (text, last seq looked at).
    fn rows_after(&self, db: &rocksdb::DB, done: u64) -> std::io::Result<(Vec<u8>, u64)> {
        let mut out = Vec::new();
        let mut last = done;
        loop {
            let rows = read::acct_after(db, last, 1000).map_err(std::io::Error::other)?;
            let Some(&(first, _)) = rows.first() else {
                break;
            };
            if last == done && done > 0 && first > done + 1 {
                tracing::warn!(
                    file = %self.name(),
                    "accounting rows {}..{} were dropped from the replicated store before \
                     this replica wrote them (it was away longer than the retention)",
                    done + 1,
                    first - 1
                );
            }
            for (seq, ev) in rows {
                last = seq;
                if !self.records.contains(&ev.kind) {
                    continue;
                }
                let row: Vec<String> = self
                    .sources
                    .iter()
                    .map(|c| csv(&field(&ev, c, &self.zone)))
                    .collect();
                out.extend_from_slice(row.join(",").as_bytes());
                out.push(b'\n');
            }
            if out.len() > 4 << 20 {
                break;
            }
        }
        Ok((out, last))
    }

    fn header_line(&self) -> Vec<u8> {
        let mut h = self.cols.join(",").into_bytes();
        h.push(b'\n');
        h
    }

    fn export(&self, db: &rocksdb::DB, pipes: &mut Pipes) -> std::io::Result<()> {
        match &self.target {
            Target::File(path) => self.export_file(db, path),
            Target::Pipe(cmd) => self.export_pipe(db, cmd, pipes),
        }
    }

    fn export_file(&self, db: &rocksdb::DB, path: &Path) -> std::io::Result<()> {
        let pos = self.position();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let now = crate::clock::now_ms();
        // A time-based move happens even when no new rows come.
        if pos.len > 0
            && let Some(every) = self.move_interval
            && now >= pos.started_ms + every.as_millis() as u64
        {
            return self.rotate(path, pos.seq);
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)?;
        // Cut off whatever a crash left after the last recorded position.
        if f.metadata()?.len() != pos.len {
            f.set_len(pos.len)?;
        }
        let (rows, last) = self.rows_after(db, pos.seq)?;
        if last == pos.seq {
            return Ok(());
        }
        let mut out = Vec::new();
        if pos.len == 0 {
            out = self.header_line();
        }
        out.extend_from_slice(&rows);
        use std::io::Seek;
        f.seek(std::io::SeekFrom::Start(pos.len))?;
        f.write_all(&out)?;
        f.sync_data()?;
        let new_len = pos.len + out.len() as u64;
        let started_ms = if pos.len == 0 { now } else { pos.started_ms };
        self.save_position(Position {
            seq: last,
            len: new_len,
            started_ms,
        })?;
        if self.max_size.is_some_and(|m| new_len >= m) {
            self.rotate(path, last)?;
        }
        Ok(())
    }

    /// Moves the current file aside as `NAME.YYYYMMDDHHMMSS.csv` and drops moved files older
    /// than `delete-after`.
    fn rotate(&self, path: &Path, seq: u64) -> std::io::Result<()> {
        let stamp = self
            .zone
            .format(crate::clock::now_ms())
            .chars()
            .filter(char::is_ascii_digit)
            .take(14)
            .collect::<String>();
        let mut rotated = path.with_extension(format!("{stamp}.csv"));
        let mut n = 1;
        while rotated.exists() {
            rotated = path.with_extension(format!("{stamp}-{n}.csv"));
            n += 1;
        }
        std::fs::rename(path, &rotated)?;
        self.save_position(Position {
            seq,
            len: 0,
            started_ms: 0,
        })?;
        if let Some(keep) = self.delete_after {
            self.delete_old(path, keep);
        }
        Ok(())
    }

    fn delete_old(&self, path: &Path, keep: Duration) {
        let (Some(dir), Some(stem)) = (path.parent(), path.file_stem().and_then(|s| s.to_str()))
        else {
            return;
        };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        let prefix = format!("{stem}.");
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let moved = name.starts_with(&prefix)
                && name.ends_with(".csv")
                && name[prefix.len()..].starts_with(|c: char| c.is_ascii_digit());
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age >= keep);
            if moved
                && old
                && let Err(err) = std::fs::remove_file(e.path())
            {
                tracing::warn!(file = %e.path().display(), "cannot delete old accounting file: {err}");
            }
        }
    }

    /// Rows go to the program's stdin. The position moves only once the program, still
    /// running, has read everything written to it; a program that exits before gets the
    /// unconfirmed rows again from its successor (at least once).
    fn export_pipe(&self, db: &rocksdb::DB, cmd: &str, pipes: &mut Pipes) -> std::io::Result<()> {
        let mut confirmed = self.position().seq;
        if let Some(p) = pipes.0.get_mut(cmd) {
            if p.child.try_wait()?.is_none() {
                let stdin = p.child.stdin.as_ref().expect("stdin is piped");
                if p.sent > confirmed && unread(stdin)? == 0 {
                    confirmed = p.sent;
                    self.save_position(Position {
                        seq: confirmed,
                        ..Default::default()
                    })?;
                }
            } else if let Some(mut old) = pipes.0.remove(cmd) {
                let _ = old.child.wait();
                tracing::warn!(program = %cmd, "accounting pipe program exited; restarting it");
            }
        }
        if !pipes.0.contains_key(cmd) {
            let (rows, last) = self.rows_after(db, confirmed)?;
            if last == confirmed {
                return Ok(());
            }
            let mut child = std::process::Command::new("/bin/sh")
                .arg("-c")
                .arg(cmd)
                .stdin(std::process::Stdio::piped())
                .spawn()?;
            let stdin = child.stdin.as_mut().expect("stdin is piped");
            let res = stdin
                .write_all(&self.header_line())
                .and_then(|_| stdin.write_all(&rows))
                .and_then(|_| stdin.flush());
            pipes.0.insert(
                cmd.to_string(),
                Pipe {
                    child,
                    sent: if res.is_ok() { last } else { confirmed },
                },
            );
            return res;
        }
        let p = pipes.0.get_mut(cmd).expect("present");
        let (rows, last) = self.rows_after(db, p.sent)?;
        if last == p.sent {
            return Ok(());
        }
        let stdin = p.child.stdin.as_mut().expect("stdin is piped");
        stdin.write_all(&rows).and_then(|_| stdin.flush())?;
        p.sent = last;
        Ok(())
    }
}

/// Exports new accounting rows to the policy's acct-files, twice a second.
pub async fn export_loop(ctl: Arc<Controller>) {
    let pipes = Arc::new(std::sync::Mutex::new(Pipes::default()));
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let policy = ctl.policy().policy.clone();
        let data_dir = ctl.settings.data_dir.clone();
        let zone = ctl.acct_zone;
        let db = ctl.db.clone();
        let pipes = pipes.clone();
        let res = tokio::task::spawn_blocking(move || {
            let mut pipes = pipes.lock().unwrap();
            for f in &policy.acct_files {
                let w = Writer::new(f, &data_dir, zone);
                if let Err(e) = w.export(&db, &mut pipes) {
                    tracing::error!(file = %w.name(), "accounting export failed: {e}");
                }
            }
        })
        .await;
        if res.is_err() {
            tracing::error!("accounting export task panicked");
        }
    }
}

/// Rows after `after` for a live consumer, at most `limit`; returns them and the last seq
/// looked at (which moves on past rows filtered out).
pub fn stream_rows(
    db: &rocksdb::DB,
    after: u64,
    cols: &[String],
    records: &[String],
    limit: usize,
    zone: &Zone,
) -> Result<(Vec<sluice_proto::admin::AcctRow>, u64), String> {
    let mut out = Vec::new();
    let mut last = after;
    for (seq, ev) in read::acct_after(db, after, limit)? {
        last = seq;
        let code = ev.kind.code();
        if !records.is_empty() && !records.iter().any(|r| r == code) {
            continue;
        }
        out.push(sluice_proto::admin::AcctRow {
            seq,
            record_type: code.to_string(),
            values: cols.iter().map(|c| field(&ev, c, zone)).collect(),
        });
    }
    Ok((out, last))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::layout::{self, open_db};

    fn policy(text: &str) -> sluice_common::policy::Policy {
        sluice_common::policy::load_str(Path::new("/x/p.conf"), text, Default::default())
            .map_err(|e| e.to_string())
            .unwrap()
            .policy
    }

    fn put_rows(db: &rocksdb::DB, from: u64, n: u64) {
        for seq in from..from + n {
            let ev = AcctEvent {
                kind: RecordType::Delivery,
                rcpt: format!("r{seq}@example.com"),
                headers: vec![("subject".into(), format!("hello, {seq}"))],
                ..Default::default()
            };
            db.put_cf(
                layout::cf(db, layout::CF_ACCT),
                layout::acct_key(seq),
                layout::ser(&ev),
            )
            .unwrap();
        }
    }

    #[test]
    fn header_columns_and_mapped_headers() {
        let tmp = tempfile::tempdir().unwrap();
        let db = open_db(&tmp.path().join("db")).unwrap();
        put_rows(&db, 1, 2);
        let p = policy(
            "<acct-file a.csv>\n record-fields d rcpt,header_Subject,jobId\n \
             map-header-to-field d Subject jobId\n</acct-file>\n",
        );
        let w = Writer::new(&p.acct_files[0], tmp.path(), Zone::default());
        w.export(&db, &mut Pipes::default()).unwrap();
        let text = std::fs::read_to_string(tmp.path().join("a.csv")).unwrap();
        assert_eq!(
            text,
            "type,rcpt,header_Subject,jobId\n\
             d,r1@example.com,\"hello, 1\",\"hello, 1\"\n\
             d,r2@example.com,\"hello, 2\",\"hello, 2\"\n"
        );
    }

    #[test]
    fn move_interval_rotates_and_delete_after_removes_old_files() {
        let tmp = tempfile::tempdir().unwrap();
        let db = open_db(&tmp.path().join("db")).unwrap();
        put_rows(&db, 1, 3);
        // An old rotated file that delete-after must remove, and an unrelated one it keeps.
        let old = tmp.path().join("a.20200101000000.csv");
        std::fs::write(&old, "old").unwrap();
        let other = tmp.path().join("b.20200101000000.csv");
        std::fs::write(&other, "other").unwrap();
        let past = std::time::SystemTime::now() - Duration::from_secs(3 * 86400);
        for f in [&old, &other] {
            std::fs::File::options()
                .write(true)
                .open(f)
                .unwrap()
                .set_modified(past)
                .unwrap();
        }
        let p = policy(
            "<acct-file a.csv>\n records d\n move-interval 1s\n delete-after 2d\n</acct-file>\n",
        );
        let w = Writer::new(&p.acct_files[0], tmp.path(), Zone::default());
        let mut pipes = Pipes::default();
        w.export(&db, &mut pipes).unwrap();
        assert_eq!(
            std::fs::read_to_string(tmp.path().join("a.csv"))
                .unwrap()
                .lines()
                .count(),
            4
        );
        std::thread::sleep(Duration::from_millis(1100));
        w.export(&db, &mut pipes).unwrap();
        assert!(
            !tmp.path().join("a.csv").exists(),
            "moved after the interval"
        );
        assert!(!old.exists(), "delete-after removes old moved files");
        assert!(other.exists(), "another file's moved copies stay");
        let moved: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.starts_with("a.") && n.ends_with(".csv"))
            .collect();
        assert_eq!(moved.len(), 1, "{moved:?}");
        // New rows start a new file with its header; nothing is written twice.
        put_rows(&db, 4, 1);
        w.export(&db, &mut pipes).unwrap();
        let text = std::fs::read_to_string(tmp.path().join("a.csv")).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert!(text.contains("r4@example.com"));
    }

    #[test]
    fn max_size_moves_the_file_aside() {
        let tmp = tempfile::tempdir().unwrap();
        let db = open_db(&tmp.path().join("db")).unwrap();
        put_rows(&db, 1, 3);
        let p = policy(
            "<acct-file a.csv>\n records d\n record-fields d rcpt\n max-size 40\n</acct-file>\n",
        );
        let w = Writer::new(&p.acct_files[0], tmp.path(), Zone::default());
        let mut pipes = Pipes::default();
        w.export(&db, &mut pipes).unwrap();
        // Past 40 bytes the file was moved aside; the next rows start a new one.
        assert!(!tmp.path().join("a.csv").exists());
        let moved: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.starts_with("a.") && n.ends_with(".csv"))
            .collect();
        assert_eq!(moved.len(), 1, "{moved:?}");
        put_rows(&db, 4, 1);
        w.export(&db, &mut pipes).unwrap();
        let text = std::fs::read_to_string(tmp.path().join("a.csv")).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
    }

    #[test]
    fn a_pipe_gets_every_row_even_when_its_program_exits() {
        let tmp = tempfile::tempdir().unwrap();
        let db = open_db(&tmp.path().join("db")).unwrap();
        let out = tmp.path().join("piped.csv");
        // The program reads three lines and exits; Sluice starts it again for the rest.
        let script = tmp.path().join("reader.sh");
        std::fs::write(
            &script,
            format!("#!/bin/sh\nhead -n 3 >> {}\n", out.display()),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let p = policy(&format!(
            "<acct-file |{}>\n records d\n record-fields d rcpt\n</acct-file>\n",
            script.display()
        ));
        let w = Writer::new(&p.acct_files[0], tmp.path(), Zone::default());
        let mut pipes = Pipes::default();
        let mut seen = 0;
        for seq in 1..=3u64 {
            put_rows(&db, seq, 1);
            // A write into a program that has just exited may fail; the row stays due.
            let end = std::time::Instant::now() + Duration::from_secs(15);
            while std::time::Instant::now() < end {
                if w.export(&db, &mut pipes).is_ok() && w.position().seq == seq {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            assert_eq!(w.position().seq, seq);
            seen += 1;
        }
        for p in pipes.0.values_mut() {
            drop(p.child.stdin.take());
            let _ = p.child.wait();
        }
        let text = std::fs::read_to_string(&out).unwrap();
        for seq in 1..=seen {
            assert!(text.contains(&format!("r{seq}@example.com")), "{text}");
        }
    }
}

#[cfg(test)]
mod zone_tests {
    use super::Zone;

    #[test]
    fn times_are_written_in_one_zone_whatever_the_host_says() {
        let t = 1_700_000_000_000; // 2023-11-14 22:13:20 UTC
        assert_eq!(Zone::default().format(t), "2023-11-14 22:13:20+0000");
        assert_eq!(Zone::parse("UTC").unwrap(), Zone::default());
        assert_eq!(
            Zone::parse("+02:00").unwrap().format(t),
            "2023-11-15 00:13:20+0200"
        );
        assert_eq!(
            Zone::parse("-0530").unwrap().format(t),
            "2023-11-14 16:43:20-0530"
        );
        assert_eq!(Zone::parse("local").unwrap(), Zone::Local);
        for bad in ["Europe/Paris", "+2", "+25:00", ""] {
            assert!(Zone::parse(bad).is_err(), "{bad}");
        }
    }
}
