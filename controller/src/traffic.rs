//! Traffic, counted from the replicated accounting rows: so every controller counts the same
//! rows, leader or not. Kept per minute for the last hour (cluster-wide, per queue, per VMTA
//! and per job) for `show status`, `show queues`, `show vmtas`, `show jobs` and the monitor,
//! and fed to the per-queue and per-VMTA Prometheus counters.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_common::metrics::TopCounters;
use sluice_common::policy::RecordType;

use crate::clock::now_ms;
use crate::queue::acct_event::AcctEvent;
use crate::queue::read;

/// Recipients received, delivered, deferred (each `t` row) and bounced.
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

/// Keys one minute keeps per kind (queues, VMTAs, jobs); more add to [`OTHER`].
const MAX_KEYS: usize = 10_000;
pub const OTHER: &str = "other";
const MINUTE_MS: u64 = 60_000;
const HOUR_MINUTES: u64 = 60;

#[derive(Default)]
struct Minute {
    /// Minutes since the epoch.
    at: u64,
    all: Counts,
    queues: HashMap<String, Counts>,
    vmtas: HashMap<String, Counts>,
    jobs: HashMap<String, Counts>,
}

fn bump(map: &mut HashMap<String, Counts>, key: &str, c: &Counts) {
    let key = if map.len() >= MAX_KEYS && !map.contains_key(key) {
        OTHER
    } else {
        key
    };
    map.entry(key.to_string()).or_default().add(c);
}

#[derive(Default)]
struct Inner {
    minutes: VecDeque<Minute>,
}

pub struct Traffic {
    inner: Mutex<Inner>,
    /// Prometheus counters per queue (DOMAIN/VMTA) and per sending VMTA.
    pub queue_counters: Arc<TopCounters>,
    pub vmta_counters: Arc<TopCounters>,
}

/// Which view of the last hour.
pub enum By {
    Queue,
    Vmta,
    Job,
}

impl Traffic {
    pub fn new(top: usize) -> Arc<Traffic> {
        Arc::new(Traffic {
            inner: Mutex::default(),
            queue_counters: Arc::new(TopCounters::new(
                "sluice_queue_outcomes",
                "recipients delivered, deferred and bounced, per queue (DOMAIN/VMTA)",
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
        let queue = format!("{}/{}", ev.queue, ev.vmta);
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
        let at = ev.time_ms / MINUTE_MS;
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let newest = g.minutes.back().map_or(at, |m| m.at.max(at));
        if at + HOUR_MINUTES < newest {
            return;
        }
        while g
            .minutes
            .front()
            .is_some_and(|m| m.at + HOUR_MINUTES < newest)
        {
            g.minutes.pop_front();
        }
        // Rows come in log order; log time can step back a little when the leader changes.
        let i = match g.minutes.iter().rposition(|m| m.at <= at) {
            Some(i) if g.minutes[i].at == at => i,
            found => {
                let i = found.map_or(0, |i| i + 1);
                g.minutes.insert(
                    i,
                    Minute {
                        at,
                        ..Default::default()
                    },
                );
                i
            }
        };
        let m = &mut g.minutes[i];
        m.all.add(&c);
        // A received row names no queue: it counts only cluster-wide and for its job.
        if ev.kind != RecordType::Received {
            bump(&mut m.queues, &queue, &c);
            bump(&mut m.vmtas, &ev.vmta, &c);
        }
        if !ev.job_id.is_empty() {
            bump(&mut m.jobs, &ev.job_id, &c);
        }
    }

    /// Cluster-wide counts for the last `minutes` minutes, this one included.
    pub fn last(&self, minutes: u64) -> Counts {
        let now = now_ms() / MINUTE_MS;
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut c = Counts::default();
        for m in g.minutes.iter().filter(|m| m.at + minutes > now) {
            c.add(&m.all);
        }
        c
    }

    /// Counts of the last hour by queue, VMTA or job.
    pub fn last_hour(&self, by: By) -> HashMap<String, Counts> {
        let now = now_ms() / MINUTE_MS;
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: HashMap<String, Counts> = HashMap::new();
        for m in g.minutes.iter().filter(|m| m.at + HOUR_MINUTES > now) {
            let map = match by {
                By::Queue => &m.queues,
                By::Vmta => &m.vmtas,
                By::Job => &m.jobs,
            };
            for (k, c) in map {
                out.entry(k.clone()).or_default().add(c);
            }
        }
        out
    }
}

/// Follows the accounting rows: from an hour before the start for the per-minute counts, and
/// from the newest row at the start for the Prometheus counters (so that a restart does not
/// count an hour again).
pub async fn follow(db: Arc<rocksdb::DB>, traffic: Arc<Traffic>) {
    let d = db.clone();
    let since = now_ms().saturating_sub(HOUR_MINUTES * MINUTE_MS);
    let start = tokio::task::spawn_blocking(move || {
        Ok::<_, String>((read::last_acct_seq(&d)?, read::acct_seq_before(&d, since)?))
    })
    .await;
    let (newest, mut seq) = match start {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::warn!("traffic: cannot read accounting rows: {e}");
            (0, 0)
        }
        Err(_) => (0, 0),
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
