//! The suppression list outside apply: operators' entries checked and converted, the scopes a
//! message is checked in at enqueue, the pages and changes ingress nodes follow, and the
//! leader's sweep of expired entries.

use std::sync::Arc;
use std::time::Duration;

use sluice_proto::queue::{SuppressionChange, SuppressionEntry};
use tonic::Status;

use crate::clock::now_ms;
use crate::node::Controller;
use crate::queue::command::{Command, SuppressChange, Suppression};
use crate::queue::read;

/// Entries and changes per reply.
pub const PAGE: usize = 50_000;
/// The longest scope, reason or note an entry keeps.
pub const MAX_TEXT: usize = 256;

pub fn to_proto(e: Suppression) -> SuppressionEntry {
    SuppressionEntry {
        address: e.address,
        scope: e.scope,
        reason: e.reason,
        source: e.source,
        time_ms: e.time_ms,
        expires_ms: e.expires_ms,
    }
}

/// A change as ingress nodes get it (without the source note, which they do not use).
pub fn change_to_proto(seq: u64, c: SuppressChange) -> SuppressionChange {
    match c {
        SuppressChange::Added(e) => SuppressionChange {
            seq,
            removed: false,
            entry: Some(SuppressionEntry {
                source: String::new(),
                ..to_proto(e)
            }),
        },
        SuppressChange::Removed { scope, address } => SuppressionChange {
            seq,
            removed: true,
            entry: Some(SuppressionEntry {
                address,
                scope,
                ..Default::default()
            }),
        },
    }
}

/// An operator's entry, checked: an address with a domain (or a whole `@domain`), a known
/// scope kind.
pub fn from_proto(e: SuppressionEntry, now: u64) -> Result<Suppression, Status> {
    let address = e.address.trim().to_ascii_lowercase();
    let ok = match address.split_once('@') {
        Some((local, domain)) => {
            !domain.is_empty()
                && !local.contains(['<', '>', ' ', ','])
                && !domain.contains(['<', '>', ' ', ',', '@'])
        }
        None => false,
    } && !address.chars().any(char::is_control);
    if !ok || address.len() > 320 {
        return Err(Status::invalid_argument(format!(
            "`{}` is not an address (user@domain, or @domain for a whole domain)",
            e.address
        )));
    }
    let scope = e.scope.trim().to_string();
    if [&scope, &e.reason, &e.source]
        .iter()
        .any(|t| t.chars().any(char::is_control))
        || scope.len() > MAX_TEXT
        || e.reason.len() > MAX_TEXT
        || e.source.len() > MAX_TEXT
    {
        return Err(Status::invalid_argument(format!(
            "`{}`: scope, reason and source must be at most {MAX_TEXT} bytes without control characters",
            e.address
        )));
    }
    if !(scope.is_empty()
        || ["vmta:", "pool:", "job:"]
            .iter()
            .any(|p| scope.strip_prefix(p).is_some_and(|n| !n.is_empty())))
    {
        return Err(Status::invalid_argument(format!(
            "scope `{scope}`: expected vmta:NAME, pool:NAME or job:ID (or none: every sender)"
        )));
    }
    Ok(Suppression {
        address,
        scope,
        reason: if e.reason.is_empty() {
            "operator".into()
        } else {
            e.reason
        },
        source: e.source,
        time_ms: if e.time_ms == 0 { now } else { e.time_ms },
        expires_ms: e.expires_ms,
    })
}

/// The scopes a message is checked in: the VMTA or pool it is queued for, and its job.
pub fn scopes(vmta: &str, job_id: &str) -> Vec<String> {
    let mut s = Vec::new();
    if !vmta.is_empty() {
        s.push(format!("vmta:{vmta}"));
        s.push(format!("pool:{vmta}"));
    }
    if !job_id.is_empty() {
        s.push(format!("job:{job_id}"));
    }
    s
}

/// Whether `address` (or its whole domain) is suppressed for these scopes: the reason.
pub fn check(
    db: &rocksdb::DB,
    address: &str,
    scopes: &[String],
    now: u64,
) -> Result<Option<String>, String> {
    let lower = address.to_ascii_lowercase();
    if let Some(e) = read::suppressed(db, &lower, scopes, now)? {
        return Ok(Some(e.reason));
    }
    if let Some((_, domain)) = lower.rsplit_once('@')
        && let Some(e) = read::suppressed(db, &format!("@{domain}"), scopes, now)?
    {
        return Ok(Some(e.reason));
    }
    Ok(None)
}

/// Removes expired entries, once a minute, on the leader.
pub async fn sweep_loop(ctl: Arc<Controller>) {
    loop {
        tokio::time::sleep(Duration::from_secs(60)).await;
        if ctl.leader_only().is_err() || ctl.state.lock().unwrap().suppress_seq == 0 {
            continue;
        }
        let db = ctl.db.clone();
        let now = now_ms();
        let expired = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            let mut start = Vec::new();
            loop {
                let (page, next) = read::suppress_page(&db, &start, PAGE)?;
                out.extend(
                    page.into_iter()
                        .filter(|e| e.expires_ms != 0 && e.expires_ms <= now)
                        .map(|e| (e.scope, e.address)),
                );
                if next.is_empty() || out.len() >= PAGE {
                    return Ok::<_, String>(out);
                }
                start = next;
            }
        })
        .await;
        let expire = match expired {
            Ok(Ok(r)) if !r.is_empty() => r,
            Ok(Err(e)) => {
                tracing::warn!("suppression sweep: {e}");
                continue;
            }
            _ => continue,
        };
        let n = expire.len();
        if let Err(e) = ctl
            .raft
            .client_write(Command::Suppress {
                now_ms: now,
                add: Vec::new(),
                remove: Vec::new(),
                expire,
            })
            .await
        {
            tracing::warn!(entries = n, "could not remove expired suppressions: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operator_entries_are_checked() {
        let e = |a: &str, s: &str| SuppressionEntry {
            address: a.into(),
            scope: s.into(),
            ..Default::default()
        };
        let ok = from_proto(e(" User@Example.COM ", "job:j1"), 5).unwrap();
        assert_eq!(
            (ok.address.as_str(), ok.reason.as_str(), ok.time_ms),
            ("user@example.com", "operator", 5)
        );
        assert!(from_proto(e("@example.com", ""), 5).is_ok());
        for bad in ["nodomain", "a@", "a b@x.test", "a@x@y"] {
            assert!(from_proto(e(bad, ""), 5).is_err(), "{bad}");
        }
        assert!(from_proto(e("a@x.test", "team:x"), 5).is_err());
        assert!(from_proto(e("a@x.test", "vmta:"), 5).is_err());
    }
}
