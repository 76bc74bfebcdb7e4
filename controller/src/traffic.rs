//! Traffic, counted from the replicated accounting rows: so every controller counts the same
//! rows, leader or not. Kept for the last hour (cluster-wide per second and per minute; per
//! queue, VMTA and job per minute) for `show status`, `show queues`, `show vmtas`, `show jobs`
//! and the monitor, and fed to the per-queue and per-VMTA Prometheus counters.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_common::metrics::TopCounters;
use sluice_common::policy::RecordType;

use crate::clock::now_ms;
use crate::queue::acct_event::AcctEvent;
use crate::queue::read;

/// Recipients received, delivered, deferred (each `t` row) and bounced. Connection-level
/// failures (`tq` rows) are not recipients and are not counted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub received: u64,
    pub delivered: u64,
    pub deferred: u64,
    pub bounced: u64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.received += o.received;
        self.delivered += o.delivered;
        self.deferred += o.deferred;
        self.bounced += o.bounced;
    }

    /// One row's contribution, if it counts.
    fn of(ev: &AcctEvent) -> Option<Counts> {
        let mut c = Counts::default();
        match ev.kind {
            RecordType::Received => c.received = 1,
            RecordType::Delivery => c.delivered = 1,
            RecordType::Transient => c.deferred = 1,
            RecordType::Bounce => c.bounced = 1,
            _ => return None,
        }
        Some(c)
    }

    pub fn proto(&self) -> sluice_proto::admin::Traffic {
        sluice_proto::admin::Traffic {
            received: self.received,
            delivered: self.delivered,
            deferred: self.deferred,
            bounced: self.bounced,
        }
    }
}

/// Keys (queues, VMTAs or jobs) kept for the last hour, each kind; more add to [`OTHER`].
const MAX_KEYS: usize = 10_000;
/// Where keys past [`MAX_KEYS`] are counted (parentheses: no queue, VMTA or job is named so).
pub const OTHER: &str = "(other)";
const HOUR_MS: u64 = 3_600_000;
const MINUTE_MS: u64 = 60_000;

/// Counts per time bucket (bucket start in ms), oldest first, for at most `span` ms.
#[derive(Default)]
struct Ring(VecDeque<(u64, Counts)>);

impl Ring {
    fn add(&mut self, bucket: u64, c: &Counts, newest: u64, span: u64) {
        // Rows come in log order; log time can step back a little when the leader changes.
        match self.0.iter().rposition(|(b, _)| *b <= bucket) {
            Some(i) if self.0[i].0 == bucket => self.0[i].1.add(c),
            found => self.0.insert(found.map_or(0, |i| i + 1), (bucket, *c)),
        }
        self.expire(newest, span);
    }

    fn expire(&mut self, newest: u64, span: u64) {
        while self.0.front().is_some_and(|(b, _)| b + span <= newest) {
            self.0.pop_front();
        }
    }

    fn since(&self, from: u64) -> Counts {
        let mut c = Counts::default();
        for (_, x) in self.0.iter().filter(|(b, _)| *b >= from) {
            c.add(x);
        }
        c
    }
}

/// Per key, per minute, for an hour; at most [`MAX_KEYS`] keys.
#[derive(Default)]
struct Keyed(HashMap<String, Ring>);

impl Keyed {
    fn add(&mut self, key: &str, minute: u64, c: &Counts, newest: u64) {
        let key = if self.0.len() >= MAX_KEYS && !self.0.contains_key(key) {
            OTHER
        } else {
            key
        };
        self.0
            .entry(key.to_string())
            .or_default()
            .add(minute, c, newest, HOUR_MS);
    }

    /// Forgets keys with nothing in the last hour.
    fn expire(&mut self, newest: u64) {
        self.0.retain(|_, r| {
            r.expire(newest, HOUR_MS);
            !r.0.is_empty()
        });
    }
}

#[derive(Default)]
struct Inner {
    /// Time of the newest row seen (ms).
    newest: u64,
    /// When keys were last swept (ms).
    swept: u64,
    seconds: Ring,
    minutes: Ring,
    queues: Keyed,
    vmtas: Keyed,
    jobs: Keyed,
}

pub struct Traffic {
    inner: Mutex<Inner>,
    /// Prometheus counters per queue (DOMAIN/VMTA or DOMAIN/POOL) and per sending VMTA.
    pub queue_counters: Arc<TopCounters>,
    pub vmta_counters: Arc<TopCounters>,
}

/// Which view of the last hour.
pub enum By {
    Queue,
    Vmta,
    Job,
}

/// The queue a row belongs to, as `show queues` names it: DOMAIN/POOL for mail sent through a
/// pool (the row's `vmta` is then the member that sent), else DOMAIN/VMTA.
pub fn queue_of(ev: &AcctEvent) -> String {
    let v = if ev.vmta_pool.is_empty() {
        &ev.vmta
    } else {
        &ev.vmta_pool
    };
    format!("{}/{v}", ev.queue)
}

impl Traffic {
    pub fn new(top: usize) -> Arc<Traffic> {
        Arc::new(Traffic {
            inner: Mutex::default(),
            queue_counters: Arc::new(TopCounters::new(
                "sluice_queue_outcomes",
                "recipients delivered, deferred and bounced, per queue (DOMAIN/VMTA or DOMAIN/POOL)",
                "queue",
                top,
            )),
            vmta_counters: Arc::new(TopCounters::new(
                "sluice_vmta_outcomes",
                "recipients delivered, deferred and bounced, per sending VMTA",
                "vmta",
                top,
            )),
        })
    }

    fn record(&self, ev: &AcctEvent, counters: bool) {
        let Some(c) = Counts::of(ev) else {
            return;
        };
        let queue = queue_of(ev);
        if counters {
            let outcome = match ev.kind {
                RecordType::Delivery => Some("delivered"),
                RecordType::Transient => Some("deferred"),
                RecordType::Bounce => Some("bounced"),
                _ => None,
            };
            if let Some(o) = outcome {
                self.queue_counters.add(&queue, o, 1);
                self.vmta_counters.add(&ev.vmta, o, 1);
            }
        }
        let t = ev.time_ms;
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        // A row dated ahead (a leader whose clock ran fast) must not push the windows on.
        g.newest = g.newest.max(t.min(now_ms() + MINUTE_MS));
        let newest = g.newest;
        if t + HOUR_MS <= newest {
            return;
        }
        let minute = t - t % MINUTE_MS;
        g.seconds.add(t - t % 1000, &c, newest, MINUTE_MS);
        g.minutes.add(minute, &c, newest, HOUR_MS);
        // A received row names no sending VMTA: it counts cluster-wide and for its job.
        if ev.kind != RecordType::Received {
            g.queues.add(&queue, minute, &c, newest);
            g.vmtas.add(&ev.vmta, minute, &c, newest);
        }
        if !ev.job_id.is_empty() {
            g.jobs.add(&ev.job_id, minute, &c, newest);
        }
        if newest >= g.swept + MINUTE_MS {
            g.swept = newest;
            g.queues.expire(newest);
            g.vmtas.expire(newest);
            g.jobs.expire(newest);
        }
    }

    /// Cluster-wide counts of the last 60 s.
    pub fn last_minute(&self) -> Counts {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.seconds.since(now_ms().saturating_sub(MINUTE_MS) + 1)
    }

    /// Cluster-wide counts of the last hour (by minute).
    pub fn last_hour_all(&self) -> Counts {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.minutes.since(now_ms().saturating_sub(HOUR_MS) + 1)
    }

    /// Counts of the last hour by queue, VMTA or job.
    pub fn last_hour(&self, by: By) -> HashMap<String, Counts> {
        let from = now_ms().saturating_sub(HOUR_MS) + 1;
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let keyed = match by {
            By::Queue => &g.queues,
            By::Vmta => &g.vmtas,
            By::Job => &g.jobs,
        };
        keyed
            .0
            .iter()
            .map(|(k, r)| (k.clone(), r.since(from)))
            .filter(|(_, c)| *c != Counts::default())
            .collect()
    }
}

/// Follows the accounting rows: from an hour before the start for the traffic views, and from
/// the newest row at the start for the Prometheus counters (so that a restart does not count
/// an hour again).
pub async fn follow(db: Arc<rocksdb::DB>, traffic: Arc<Traffic>) {
    let since = now_ms().saturating_sub(HOUR_MS);
    let (newest, mut seq) = loop {
        let d = db.clone();
        let start = tokio::task::spawn_blocking(move || {
            Ok::<_, String>((read::last_acct_seq(&d)?, read::acct_seq_before(&d, since)?))
        })
        .await;
        match start {
            Ok(Ok(s)) => break s,
            Ok(Err(e)) => tracing::warn!("traffic: cannot read accounting rows: {e}"),
            Err(e) => tracing::warn!("traffic: {e}"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    loop {
        let d = db.clone();
        let rows = tokio::task::spawn_blocking(move || read::acct_after(&d, seq, 5000)).await;
        let rows = match rows {
            Ok(Ok(rows)) => rows,
            Ok(Err(e)) => {
                tracing::warn!("traffic: cannot read accounting rows: {e}");
                Vec::new()
            }
            Err(_) => Vec::new(),
        };
        let full = rows.len() >= 5000;
        for (s, ev) in rows {
            seq = s;
            traffic.record(&ev, s > newest);
        }
        if !full {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(kind: RecordType, t: u64, queue: &str, vmta: &str, pool: &str) -> AcctEvent {
        AcctEvent {
            kind,
            time_ms: t,
            queue: queue.into(),
            vmta: vmta.into(),
            vmta_pool: pool.into(),
            job_id: "j".into(),
            ..Default::default()
        }
    }

    #[test]
    fn pool_mail_counts_for_the_pool_queue_and_the_member_vmta() {
        let t = Traffic::new(10);
        let now = now_ms();
        t.record(&row(RecordType::Delivery, now, "a.test", "v1", "p"), true);
        t.record(&row(RecordType::Transient, now, "a.test", "v2", "p"), true);
        t.record(&row(RecordType::Bounce, now, "b.test", "v1", ""), true);
        t.record(
            &row(RecordType::TransientQueue, now, "b.test", "v1", ""),
            true,
        );
        let q = t.last_hour(By::Queue);
        assert_eq!(q["a.test/p"].delivered, 1);
        assert_eq!(q["a.test/p"].deferred, 1);
        assert_eq!(q["b.test/v1"].bounced, 1);
        assert_eq!(q.len(), 2, "{:?}", q.keys());
        let v = t.last_hour(By::Vmta);
        assert_eq!((v["v1"].delivered, v["v1"].bounced), (1, 1));
        assert_eq!(v["v2"].deferred, 1);
        assert_eq!(t.last_hour(By::Job)["j"].delivered, 1);
        assert_eq!(t.last_minute().deferred, 1, "a tq row is not a recipient");
    }

    #[test]
    fn old_rows_leave_the_windows() {
        let t = Traffic::new(10);
        let now = now_ms();
        t.record(
            &row(RecordType::Delivery, now - 2 * HOUR_MS, "a.test", "v1", ""),
            true,
        );
        t.record(
            &row(
                RecordType::Delivery,
                now - 30 * MINUTE_MS,
                "a.test",
                "v1",
                "",
            ),
            true,
        );
        t.record(
            &row(RecordType::Delivery, now - 90_000, "a.test", "v1", ""),
            true,
        );
        t.record(
            &row(RecordType::Delivery, now - 10_000, "a.test", "v1", ""),
            true,
        );
        assert_eq!(t.last_minute().delivered, 1);
        assert_eq!(t.last_hour_all().delivered, 3);
        assert_eq!(t.last_hour(By::Queue)["a.test/v1"].delivered, 3);
    }
}
