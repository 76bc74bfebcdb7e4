//! Budget usage, kept by the state machine so that every controller (and so a new leader)
//! knows what the cluster has sent: open connections, messages and connections granted whose
//! outcome is not known yet, and by time, the messages and connections that reached a
//! receiver. It is built from lease and outcome commands, which carry the leader's time, so
//! every replica holds the same figures.
//!
//! The rule that makes limits hold where the receiver counts: a message counts against a rate
//! window from the moment it is granted until one window after its outcome is known. Any
//! window of arrivals at the receiver then holds at most the limit (`docs/ARCHITECTURE.md`).

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;

use rocksdb::{DB, IteratorMode};
use serde::{Deserialize, Serialize};

use super::layout::{self, CF_LEDGER};
use super::tx::{StoreError, Tx};

/// What a budget counts against.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum BudgetKey {
    /// A queue's destination through one VMTA: max-smtp-out, max-msg-rate, max-connect-rate.
    Queue(String, String),
    /// A destination from one source IP: source-ip-max-*.
    SourceIp(String, IpAddr),
    /// One VMTA: its own max-smtp-out, max-cold-virtual-mta-msg.
    Vmta(String),
}

const SEC: u64 = 1000;
const MIN: u64 = 60_000;
/// Second buckets older than this become minute buckets.
const SEC_KEEP_MS: u64 = 15 * MIN;
/// Minute buckets older than this are dropped: the longest window counted exactly.
pub const KEEP_MS: u64 = 25 * 3_600_000;

const GRAN_SEC: u8 = 0;
const GRAN_MIN: u8 = 1;
const SERIES_MSGS: u8 = 0;
const SERIES_CONNECTS: u8 = 1;

/// Counts by time: one-second buckets for the last quarter hour, then one-minute buckets.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Series {
    secs: VecDeque<(u64, u64)>,
    mins: VecDeque<(u64, u64)>,
}

impl Series {
    /// Events in buckets that end after `from_ms` (a partly covered bucket counts whole).
    pub fn count_since(&self, from_ms: u64) -> u64 {
        let s: u64 = self
            .secs
            .iter()
            .rev()
            .take_while(|(t, _)| t + SEC > from_ms)
            .map(|(_, n)| n)
            .sum();
        let m: u64 = self
            .mins
            .iter()
            .rev()
            .take_while(|(t, _)| t + MIN > from_ms)
            .map(|(_, n)| n)
            .sum();
        s + m
    }

    fn is_empty(&self) -> bool {
        self.secs.is_empty() && self.mins.is_empty()
    }

    /// Adds `n` at `now`; returns the second bucket's start and new total.
    fn add(&mut self, now: u64, n: u64) -> (u64, u64) {
        let start = now - now % SEC;
        match self.secs.back_mut() {
            Some((t, c)) if *t == start => {
                *c += n;
                (start, *c)
            }
            // A leader whose clock is behind its predecessor's: count in the newest bucket.
            Some((t, c)) if *t > start => {
                *c += n;
                (*t, *c)
            }
            _ => {
                self.secs.push_back((start, n));
                (start, n)
            }
        }
    }
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct Usage {
    /// Open leases (connections).
    pub conns: u32,
    /// Leases whose connection has not reported yet.
    pub conns_out: u32,
    /// Message parts leased whose outcome is not known yet.
    pub msgs_out: u64,
    /// Message parts whose outcome is known, by outcome time.
    pub msgs: Series,
    /// Connections that reported (or expired), by that time.
    pub connects: Series,
}

impl Usage {
    fn is_idle(&self) -> bool {
        self.conns == 0
            && self.conns_out == 0
            && self.msgs_out == 0
            && self.msgs.is_empty()
            && self.connects.is_empty()
    }
}

#[derive(Debug)]
pub struct Ledger {
    usage: HashMap<BudgetKey, Usage>,
    /// The oldest second and minute bucket starts held (u64::MAX: none), so that a pass over
    /// every key runs only when a bucket is due to move or go. Both follow from the buckets,
    /// so a reloaded ledger makes the same passes as one that never stopped.
    oldest_sec: u64,
    oldest_min: u64,
}

impl Default for Ledger {
    fn default() -> Self {
        Ledger {
            usage: HashMap::new(),
            oldest_sec: u64::MAX,
            oldest_min: u64::MAX,
        }
    }
}

fn key_bytes(series: u8, key: &BudgetKey) -> Vec<u8> {
    let mut b = vec![series];
    b.extend(layout::ser(key));
    b
}

impl Ledger {
    pub fn usage(&self, key: &BudgetKey) -> Option<&Usage> {
        self.usage.get(key)
    }

    /// The time series from the ledger column family; open-lease counts are added by the
    /// caller from the lease records.
    pub fn load(db: &DB) -> Result<Ledger, String> {
        let mut l = Ledger::default();
        for kv in db.iterator_cf(layout::cf(db, CF_LEDGER), IteratorMode::Start) {
            let (k, v) = kv.map_err(|e| e.to_string())?;
            let (gran, start, rest) = layout::split_ledger_key(&k).ok_or("bad ledger key")?;
            let (&series, key) = rest.split_first().ok_or("bad ledger key")?;
            let key: BudgetKey = layout::de(key)?;
            let n = u64::from_be_bytes(v.as_ref().try_into().map_err(|_| "bad ledger value")?);
            let u = l.usage.entry(key).or_default();
            let s = if series == SERIES_MSGS {
                &mut u.msgs
            } else {
                &mut u.connects
            };
            // Keys sort by granularity, then time: each deque fills in time order.
            if gran == GRAN_SEC {
                s.secs.push_back((start, n));
                l.oldest_sec = l.oldest_sec.min(start);
            } else {
                s.mins.push_back((start, n));
                l.oldest_min = l.oldest_min.min(start);
            }
        }
        Ok(l)
    }

    pub fn lease_opened(&mut self, keys: &[BudgetKey]) {
        for k in keys {
            let u = self.usage.entry(k.clone()).or_default();
            u.conns += 1;
            u.conns_out += 1;
        }
    }

    pub fn parts_leased(&mut self, keys: &[BudgetKey], n: u64) {
        for k in keys {
            self.usage.entry(k.clone()).or_default().msgs_out += n;
        }
    }

    /// `n` leased parts got their outcome at `now`.
    pub fn parts_done(&mut self, tx: &mut Tx, keys: &[BudgetKey], n: u64, now: u64) {
        for k in keys {
            let u = self.usage.entry(k.clone()).or_default();
            u.msgs_out = u.msgs_out.saturating_sub(n);
            let (start, total) = u.msgs.add(now, n);
            self.oldest_sec = self.oldest_sec.min(start);
            tx.put_ledger(
                layout::ledger_key(GRAN_SEC, start, &key_bytes(SERIES_MSGS, k)),
                total,
            );
        }
    }

    /// `n` leased parts went back to the queue untried.
    pub fn parts_returned(&mut self, keys: &[BudgetKey], n: u64) {
        for k in keys {
            let u = self.usage.entry(k.clone()).or_default();
            u.msgs_out = u.msgs_out.saturating_sub(n);
        }
    }

    /// A lease's connection reported for the first time (or its lease expired) at `now`.
    pub fn connected(&mut self, tx: &mut Tx, keys: &[BudgetKey], now: u64) {
        for k in keys {
            let u = self.usage.entry(k.clone()).or_default();
            u.conns_out = u.conns_out.saturating_sub(1);
            let (start, total) = u.connects.add(now, 1);
            self.oldest_sec = self.oldest_sec.min(start);
            tx.put_ledger(
                layout::ledger_key(GRAN_SEC, start, &key_bytes(SERIES_CONNECTS, k)),
                total,
            );
        }
    }

    /// A connection known to have reported, whose time is already in the stored buckets.
    pub fn connected_unrecorded(&mut self, keys: &[BudgetKey]) {
        for k in keys {
            let u = self.usage.entry(k.clone()).or_default();
            u.conns_out = u.conns_out.saturating_sub(1);
        }
    }

    pub fn lease_closed(&mut self, keys: &[BudgetKey]) {
        for k in keys {
            let u = self.usage.entry(k.clone()).or_default();
            u.conns = u.conns.saturating_sub(1);
        }
    }

    /// Second buckets older than a quarter hour become minute buckets, minute buckets past
    /// `KEEP_MS` go, idle keys are forgotten. Runs its pass only when a bucket is due.
    pub fn maintain(&mut self, tx: &mut Tx, now: u64) -> Result<(), StoreError> {
        let sec_cut = now.saturating_sub(SEC_KEEP_MS);
        let min_cut = now.saturating_sub(KEEP_MS);
        if self.oldest_sec >= sec_cut && self.oldest_min >= min_cut {
            return Ok(());
        }
        let (mut oldest_sec, mut oldest_min) = (u64::MAX, u64::MAX);
        let mut dropped_min = false;
        let mut keys: Vec<BudgetKey> = self.usage.keys().cloned().collect();
        keys.sort();
        for k in keys {
            let u = self.usage.get_mut(&k).expect("listed key");
            for (series, s) in [
                (SERIES_MSGS, &mut u.msgs),
                (SERIES_CONNECTS, &mut u.connects),
            ] {
                let kb = key_bytes(series, &k);
                while let Some(&(t, n)) = s.secs.front()
                    && t < sec_cut
                {
                    s.secs.pop_front();
                    let m = t - t % MIN;
                    if m < min_cut {
                        continue; // already past the longest window
                    }
                    let total = match s.mins.back_mut() {
                        Some((mt, c)) if *mt >= m => {
                            *c += n;
                            *c
                        }
                        _ => {
                            s.mins.push_back((m, n));
                            n
                        }
                    };
                    let mt = s.mins.back().expect("just pushed").0;
                    tx.put_ledger(layout::ledger_key(GRAN_MIN, mt, &kb), total);
                }
                while s.mins.front().is_some_and(|&(t, _)| t < min_cut) {
                    s.mins.pop_front();
                    dropped_min = true;
                }
                if let Some(&(t, _)) = s.secs.front() {
                    oldest_sec = oldest_sec.min(t);
                }
                if let Some(&(t, _)) = s.mins.front() {
                    oldest_min = oldest_min.min(t);
                }
            }
            if u.is_idle() {
                self.usage.remove(&k);
            }
        }
        if self.oldest_sec < sec_cut {
            tx.delete_ledger_range(layout::ledger_range(GRAN_SEC, sec_cut));
        }
        if dropped_min {
            tx.delete_ledger_range(layout::ledger_range(GRAN_MIN, min_cut));
        }
        self.oldest_sec = oldest_sec;
        self.oldest_min = oldest_min;
        Ok(())
    }

    /// Everything, for comparing two states in tests.
    pub fn snapshot(&self) -> Vec<(BudgetKey, Usage)> {
        let mut v: Vec<(BudgetKey, Usage)> = self
            .usage
            .iter()
            .filter(|(_, u)| !u.is_idle())
            .map(|(k, u)| (k.clone(), u.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_count_whole_buckets_and_coalesce_into_minutes() {
        let mut s = Series::default();
        let t0 = 1_700_000_000_000u64;
        s.add(t0 + 100, 2);
        s.add(t0 + 900, 1);
        s.add(t0 + 5_500, 4);
        assert_eq!(s.count_since(t0 + 5_000), 4);
        assert_eq!(s.count_since(t0 + 1_000), 4);
        // A bucket partly inside the window counts whole: never fewer than really happened.
        assert_eq!(s.count_since(t0 + 500), 7);
        assert_eq!(s.count_since(t0 - 10_000), 7);
        // A clock that went back counts in the newest bucket.
        s.add(t0 + 1_000, 1);
        assert_eq!(s.count_since(t0 + 5_000), 5);
    }
}
