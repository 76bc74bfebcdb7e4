//! Reads of the stored queue outside apply: a leased message's record and body, every message
//! (for operators and tests), and accounting rows by seq. Scans read a RocksDB snapshot, so
//! they never hold the state lock and never block apply; a body read takes the lock briefly
//! to look among the held bodies (`bodies`).

use std::sync::Mutex;

use bytes::Bytes;
use rocksdb::{DB, Direction, IteratorMode};

use super::acct_event::AcctEvent;
use super::command::{SuppressChange, Suppression};
use super::layout::{self, CF_ACCT, CF_BODY, CF_MSG, CF_SUPPRESS};
use super::state::{MsgRecord, QueueState};

pub fn message(db: &DB, id: u64) -> Result<Option<MsgRecord>, String> {
    match db
        .get_cf(layout::cf(db, CF_MSG), layout::msg_key(id))
        .map_err(|e| format!("reading message {id:016x}: {e}"))?
    {
        Some(b) => layout::de(&b).map(Some),
        None => Ok(None),
    }
}

/// A message's body: held in memory or stored (`bodies`). A body leaves the held set only
/// once it is in RocksDB (written under the state lock, by apply, a purge or a shutdown) or
/// the message is finished, so a body missed in memory is found in RocksDB.
pub fn body(db: &DB, state: &Mutex<QueueState>, id: u64) -> Result<Option<Bytes>, String> {
    if let Some(b) = state.lock().unwrap().bodies.get(id) {
        return Ok(Some(b));
    }
    db.get_cf(layout::cf(db, CF_BODY), layout::msg_key(id))
        .map(|b| b.map(Bytes::from))
        .map_err(|e| format!("reading the body of {id:016x}: {e}"))
}

/// Calls `f` with each stored message, in id order, from one snapshot (without holding them
/// all in memory).
pub fn each_message(db: &DB, mut f: impl FnMut(u64, MsgRecord)) -> Result<(), String> {
    let snap = db.snapshot();
    for kv in snap.iterator_cf(layout::cf(db, CF_MSG), IteratorMode::Start) {
        let (k, v) = kv.map_err(|e| e.to_string())?;
        let id = layout::id_of_key(&k).ok_or("bad message key")?;
        f(id, layout::de(&v)?);
    }
    Ok(())
}

/// Calls `f` with accounting rows from the newest back, at most `limit`, until `f` says
/// false; true when it stopped at the limit with older rows left.
pub fn each_acct_newest(
    db: &DB,
    limit: usize,
    mut f: impl FnMut(u64, AcctEvent) -> bool,
) -> Result<bool, String> {
    let rows = db.iterator_cf(layout::cf(db, CF_ACCT), IteratorMode::End);
    for (n, kv) in rows.enumerate() {
        if n >= limit {
            return Ok(true);
        }
        let (k, v) = kv.map_err(|e| e.to_string())?;
        if !f(
            layout::id_of_key(&k).ok_or("bad accounting key")?,
            layout::de(&v)?,
        ) {
            return Ok(false);
        }
    }
    Ok(false)
}

/// Every stored message, in id order, from one snapshot.
pub fn messages(db: &DB) -> Result<Vec<(u64, MsgRecord)>, String> {
    let snap = db.snapshot();
    let mut out = Vec::new();
    for kv in snap.iterator_cf(layout::cf(db, CF_MSG), IteratorMode::Start) {
        let (k, v) = kv.map_err(|e| e.to_string())?;
        let id = layout::id_of_key(&k).ok_or("bad message key")?;
        out.push((id, layout::de(&v)?));
    }
    Ok(out)
}

/// Up to `limit` accounting rows after `seq`, in order.
pub fn acct_after(db: &DB, seq: u64, limit: usize) -> Result<Vec<(u64, AcctEvent)>, String> {
    let start = layout::acct_key(seq.saturating_add(1));
    let mut out = Vec::new();
    for kv in db.iterator_cf(
        layout::cf(db, CF_ACCT),
        IteratorMode::From(&start, Direction::Forward),
    ) {
        let (k, v) = kv.map_err(|e| e.to_string())?;
        let s = layout::id_of_key(&k).ok_or("bad accounting key")?;
        out.push((s, layout::de(&v)?));
        if out.len() >= limit {
            break;
        }
    }
    Ok(out)
}

/// The newest accounting seq whose row is older than `since_ms` (0 when none is): reading
/// after it gives every row from `since_ms` on.
pub fn acct_seq_before(db: &DB, since_ms: u64) -> Result<u64, String> {
    for kv in db.iterator_cf(layout::cf(db, CF_ACCT), IteratorMode::End) {
        let (k, v) = kv.map_err(|e| e.to_string())?;
        let ev: AcctEvent = layout::de(&v)?;
        if ev.time_ms < since_ms {
            return Ok(layout::id_of_key(&k).unwrap_or(0));
        }
    }
    Ok(0)
}

/// The newest accounting seq stored.
pub fn last_acct_seq(db: &DB) -> Result<u64, String> {
    match db
        .iterator_cf(layout::cf(db, CF_ACCT), IteratorMode::End)
        .next()
    {
        Some(kv) => {
            let (k, _) = kv.map_err(|e| e.to_string())?;
            Ok(layout::id_of_key(&k).unwrap_or(0))
        }
        None => Ok(0),
    }
}

/// Suppression changes after `after`, at most `limit`; None when some of them are no longer
/// kept (the reader must load the whole list again).
pub fn suppress_changes(
    db: &DB,
    after: u64,
    limit: usize,
) -> Result<Option<Vec<(u64, SuppressChange)>>, String> {
    let start = layout::suppress_change_key(after);
    let mut out = Vec::new();
    let mut ro = rocksdb::ReadOptions::default();
    ro.set_iterate_upper_bound(b"d".to_vec());
    for kv in db.iterator_cf_opt(
        layout::cf(db, CF_SUPPRESS),
        ro,
        IteratorMode::From(&start, Direction::Forward),
    ) {
        let (k, v) = kv.map_err(|e| e.to_string())?;
        let seq = layout::seq_of_change_key(&k).ok_or("bad suppression change key")?;
        if seq <= after {
            continue;
        }
        // The first change read must be the next one, or some were dropped.
        if out.is_empty() && seq != after + 1 {
            return Ok(None);
        }
        out.push((seq, layout::de(&v)?));
        if out.len() >= limit {
            break;
        }
    }
    Ok(Some(out))
}

/// A page of the suppression list in key order, from `start` (exclusive; empty: the start),
/// with the key to continue after (empty at the end).
pub fn suppress_page(
    db: &DB,
    start: &[u8],
    limit: usize,
) -> Result<(Vec<Suppression>, Vec<u8>), String> {
    let (from, to) = layout::suppress_entries();
    // A start outside the entries' range starts at their beginning.
    let begin = if start < from.as_slice() || start >= to.as_slice() {
        from
    } else {
        start.to_vec()
    };
    let start: &[u8] = if begin == start { start } else { &[] };
    let mut ro = rocksdb::ReadOptions::default();
    ro.set_iterate_upper_bound(to);
    let mut out = Vec::new();
    let mut last = Vec::new();
    for kv in db.iterator_cf_opt(
        layout::cf(db, CF_SUPPRESS),
        ro,
        IteratorMode::From(&begin, Direction::Forward),
    ) {
        let (k, v) = kv.map_err(|e| e.to_string())?;
        if !start.is_empty() && *k == *start {
            continue;
        }
        if out.len() >= limit {
            return Ok((out, last));
        }
        out.push(layout::de(&v)?);
        last = k.to_vec();
    }
    Ok((out, Vec::new()))
}

/// The entry that suppresses `address` for mail in any of `scopes` (or for every sender),
/// unless it expired by `now_ms`.
pub fn suppressed(
    db: &DB,
    address: &str,
    scopes: &[String],
    now_ms: u64,
) -> Result<Option<Suppression>, String> {
    for scope in std::iter::once("").chain(scopes.iter().map(String::as_str)) {
        if let Some(v) = db
            .get_cf(
                layout::cf(db, CF_SUPPRESS),
                layout::suppress_key(scope, address),
            )
            .map_err(|e| e.to_string())?
        {
            let e: Suppression = layout::de(&v)?;
            if e.expires_ms == 0 || e.expires_ms > now_ms {
                return Ok(Some(e));
            }
        }
    }
    Ok(None)
}

/// Every entry of one address (all scopes). Scopes are few, so this reads them all.
pub fn suppressions_of(db: &DB, address: &str) -> Result<Vec<Suppression>, String> {
    let mut out = Vec::new();
    let mut start = Vec::new();
    let address = address.to_ascii_lowercase();
    loop {
        let (page, next) = suppress_page(db, &start, 10_000)?;
        out.extend(page.into_iter().filter(|e| e.address == address));
        if next.is_empty() {
            return Ok(out);
        }
        start = next;
    }
}
