//! `sluice suppress`: the replicated suppression list. CSV columns for import and export:
//! `address,scope,reason,source,time,expires` (times in RFC 3339, UTC; `expires` empty for
//! never). Import needs only the first column.

use std::io::{BufRead, Write};

use anyhow::{Context, bail};
use clap::Subcommand;
use sluice_proto::admin::admin_client::AdminClient;
use sluice_proto::admin::{SuppressListRequest, SuppressRequest};
use sluice_proto::queue::SuppressionEntry;

use crate::ControllerAddr;

/// Entries per request.
const BATCH: usize = 10_000;

#[derive(Subcommand)]
pub enum SuppressCmd {
    /// Suppress addresses (`user@domain`, or `@domain` for a whole domain).
    Add {
        #[arg(required = true)]
        addresses: Vec<String>,
        /// Only for mail of one VMTA, pool or job: `vmta:NAME`, `pool:NAME`, `job:ID`.
        #[arg(long, default_value = "")]
        scope: String,
        #[arg(long, default_value = "operator")]
        reason: String,
        /// A note kept with the entry.
        #[arg(long, default_value = "")]
        note: String,
        /// Lifted by itself after this long (30d); default: until removed.
        #[arg(long = "for")]
        for_: Option<String>,
        #[command(flatten)]
        at: ControllerAddr,
    },
    /// Lift suppressions.
    Remove {
        #[arg(required = true)]
        addresses: Vec<String>,
        #[arg(long, default_value = "")]
        scope: String,
        #[command(flatten)]
        at: ControllerAddr,
    },
    /// List entries (every scope of one address with --address).
    List {
        #[arg(long)]
        address: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        at: ControllerAddr,
    },
    /// Add every entry of a CSV file (`-` for standard input).
    Import {
        file: String,
        #[command(flatten)]
        at: ControllerAddr,
    },
    /// Write the whole list as CSV (to standard output without a file).
    Export {
        file: Option<String>,
        #[command(flatten)]
        at: ControllerAddr,
    },
}

fn time_text(ms: u64) -> String {
    if ms == 0 {
        return String::new();
    }
    chrono::DateTime::from_timestamp_millis(ms as i64)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

fn parse_time(s: &str) -> anyhow::Result<u64> {
    if s.is_empty() {
        return Ok(0);
    }
    Ok(chrono::DateTime::parse_from_rfc3339(s)
        .with_context(|| format!("`{s}` is not an RFC 3339 time"))?
        .timestamp_millis()
        .max(0) as u64)
}

/// One CSV line's fields (double quotes around a field, `""` inside one).
fn csv_fields(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => out.push(std::mem::take(&mut cur)),
            (c, _) => cur.push(c),
        }
    }
    out.push(cur);
    out
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\"").replace(['\r', '\n'], " "))
    } else {
        s.to_string()
    }
}

async fn send(
    at: &str,
    add: Vec<SuppressionEntry>,
    remove: Vec<SuppressionEntry>,
) -> anyhow::Result<u64> {
    let req = SuppressRequest { add, remove };
    let r = &req;
    let reply = on_leader!(at, |c| c.suppress(r.clone()));
    Ok(reply.count)
}

/// Every entry, a page at a time.
async fn each_page(
    at: &str,
    address: Option<String>,
    limit: usize,
    mut f: impl FnMut(Vec<SuppressionEntry>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut start = Vec::new();
    let mut seen = 0;
    loop {
        let req = SuppressListRequest {
            start_key: start.clone().into(),
            limit: (limit - seen).min(50_000) as u32,
            address: address.clone().unwrap_or_default(),
        };
        let r = &req;
        let reply = on_leader!(at, |c| c.suppress_list(r.clone()));
        seen += reply.entries.len();
        f(reply.entries)?;
        if reply.next_key.is_empty() || seen >= limit {
            return Ok(());
        }
        start = reply.next_key.to_vec();
    }
}

pub async fn run(cmd: SuppressCmd) -> anyhow::Result<()> {
    match cmd {
        SuppressCmd::Add {
            addresses,
            scope,
            reason,
            note,
            for_,
            at,
        } => {
            let expires_ms = match for_ {
                None => 0,
                Some(f) => {
                    let d = sluice_common::policy::value::parse_duration(&f)
                        .map_err(anyhow::Error::msg)?;
                    if d.is_zero() {
                        bail!("--for {f}: say how long, such as 30d");
                    }
                    crate::now_ms() + d.as_millis() as u64
                }
            };
            let add = addresses
                .iter()
                .map(|a| SuppressionEntry {
                    address: a.clone(),
                    scope: scope.clone(),
                    reason: reason.clone(),
                    source: note.clone(),
                    time_ms: 0,
                    expires_ms,
                })
                .collect();
            let n = send(&at.controller, add, Vec::new()).await?;
            println!("{n} suppressed");
        }
        SuppressCmd::Remove {
            addresses,
            scope,
            at,
        } => {
            let remove = addresses
                .iter()
                .map(|a| SuppressionEntry {
                    address: a.clone(),
                    scope: scope.clone(),
                    ..Default::default()
                })
                .collect();
            let n = send(&at.controller, Vec::new(), remove).await?;
            println!("{n} lifted");
        }
        SuppressCmd::List {
            address,
            limit,
            json,
            at,
        } => {
            let mut all = Vec::new();
            each_page(&at.controller, address, limit.max(1), |p| {
                all.extend(p);
                Ok(())
            })
            .await?;
            if json {
                let v: Vec<_> = all
                    .iter()
                    .map(|e| {
                        serde_json::json!({"address": e.address, "scope": e.scope,
                            "reason": e.reason, "source": e.source, "time_ms": e.time_ms,
                            "expires_ms": e.expires_ms})
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                println!(
                    "{:<40} {:<16} {:<18} {:<24} EXPIRES",
                    "ADDRESS", "SCOPE", "REASON", "SINCE"
                );
                for e in &all {
                    println!(
                        "{:<40} {:<16} {:<18} {:<24} {}",
                        e.address,
                        if e.scope.is_empty() { "*" } else { &e.scope },
                        e.reason,
                        time_text(e.time_ms),
                        if e.expires_ms == 0 {
                            "never".into()
                        } else {
                            time_text(e.expires_ms)
                        }
                    );
                }
            }
        }
        SuppressCmd::Import { file, at } => {
            let reader: Box<dyn BufRead> = if file == "-" {
                Box::new(std::io::BufReader::new(std::io::stdin()))
            } else {
                Box::new(std::io::BufReader::new(
                    std::fs::File::open(&file).with_context(|| format!("opening {file}"))?,
                ))
            };
            let mut batch = Vec::new();
            let mut total = 0;
            for (n, line) in reader.lines().enumerate() {
                let line = line.with_context(|| format!("{file}:{}", n + 1))?;
                let line = line.trim();
                if line.is_empty()
                    || line.starts_with('#')
                    || (n == 0 && line.starts_with("address"))
                {
                    continue;
                }
                let f = csv_fields(line);
                let get = |i: usize| f.get(i).map(|s| s.trim().to_string()).unwrap_or_default();
                let entry = SuppressionEntry {
                    address: get(0),
                    scope: get(1),
                    reason: get(2),
                    source: get(3),
                    time_ms: parse_time(&get(4)).with_context(|| format!("{file}:{}", n + 1))?,
                    expires_ms: parse_time(&get(5)).with_context(|| format!("{file}:{}", n + 1))?,
                };
                batch.push(entry);
                if batch.len() >= BATCH {
                    total += send(&at.controller, std::mem::take(&mut batch), Vec::new())
                        .await
                        .with_context(|| format!("{file}: the batch ending at line {}", n + 1))?;
                }
            }
            if !batch.is_empty() {
                total += send(&at.controller, batch, Vec::new())
                    .await
                    .with_context(|| format!("{file}: the last batch"))?;
            }
            println!("{total} imported");
        }
        SuppressCmd::Export { file, at } => {
            let mut out: Box<dyn Write> = match &file {
                Some(f) => Box::new(std::io::BufWriter::new(
                    std::fs::File::create(f).with_context(|| format!("creating {f}"))?,
                )),
                None => Box::new(std::io::BufWriter::new(std::io::stdout())),
            };
            writeln!(out, "address,scope,reason,source,time,expires")?;
            each_page(&at.controller, None, usize::MAX, |page| {
                for e in page {
                    writeln!(
                        out,
                        "{},{},{},{},{},{}",
                        csv_field(&e.address),
                        csv_field(&e.scope),
                        csv_field(&e.reason),
                        csv_field(&e.source),
                        time_text(e.time_ms),
                        time_text(e.expires_ms)
                    )?;
                }
                Ok(())
            })
            .await?;
            out.flush()?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_round_trip() {
        let f = csv_field("a note, with \"quotes\"");
        assert_eq!(
            csv_fields(&format!("a@x.test,,operator,{f},,")),
            vec![
                "a@x.test",
                "",
                "operator",
                "a note, with \"quotes\"",
                "",
                ""
            ]
        );
        let t = 1_700_000_000_123;
        assert_eq!(parse_time(&time_text(t)).unwrap(), t);
        assert!(parse_time("yesterday").is_err());
    }
}
