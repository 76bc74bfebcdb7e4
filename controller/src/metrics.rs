//! What a controller counts for Prometheus (`/metrics`, see `docs/metrics.md`). Outcomes per
//! queue and VMTA are `crate::traffic`'s, from the replicated accounting rows; Raft and queue
//! gauges are read at each scrape.

use std::sync::{Arc, LazyLock};

use sluice_common::metrics::prometheus_client::collector::Collector;
use sluice_common::metrics::prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use sluice_common::metrics::prometheus_client::metrics::MetricType;
use sluice_common::metrics::prometheus_client::metrics::gauge::ConstGauge;
use sluice_common::metrics::{
    Counter, Family, Gauge, Histogram, Label, Registry, exponential_buckets, label,
};

use crate::node::Controller;
use crate::sched::budgets::{Wait, Waits};

pub struct ControllerMetrics {
    pub leases_granted: Counter,
    pub leases_expired: Counter,
    /// Times a due queue was kept from a connection, by the budget (`reason`) that did it.
    pub budget_waits: Family<Label, Counter>,
    /// Bytes and messages of each Raft entry the leader proposes for enqueued mail.
    pub entry_bytes: Histogram,
    pub entry_messages: Histogram,
    /// The last log index known committed (saved by the log store).
    pub commit_index: Gauge,
}

pub static METRICS: LazyLock<ControllerMetrics> = LazyLock::new(|| ControllerMetrics {
    leases_granted: Counter::default(),
    leases_expired: Counter::default(),
    budget_waits: Family::default(),
    entry_bytes: Histogram::new(exponential_buckets(1024.0, 4.0, 10)),
    entry_messages: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
    commit_index: Gauge::default(),
});

impl ControllerMetrics {
    pub fn budget_waits(&self, waits: &Waits) {
        for (w, n) in Wait::ALL.iter().zip(waits) {
            if *n > 0 {
                self.budget_waits
                    .get_or_create(&label("reason", w.name()))
                    .inc_by(*n);
            }
        }
    }
}

/// The controller's registry.
pub fn registry(ctl: Arc<Controller>) -> Registry {
    let m = &*METRICS;
    for w in Wait::ALL {
        let _ = m.budget_waits.get_or_create(&label("reason", w.name()));
    }
    let mut r = Registry::default();
    r.register(
        "sluice_leases_granted",
        "leases granted to workers (one connection's work each)",
        m.leases_granted.clone(),
    );
    r.register(
        "sluice_leases_expired",
        "leases ended because their worker fell silent",
        m.leases_expired.clone(),
    );
    r.register(
        "sluice_budget_waits",
        "times a due queue was kept from a connection, by the budget that did it",
        m.budget_waits.clone(),
    );
    r.register(
        "sluice_raft_entry_bytes",
        "body bytes in each Raft entry of enqueued mail",
        m.entry_bytes.clone(),
    );
    r.register(
        "sluice_raft_entry_messages",
        "messages in each Raft entry of enqueued mail (group commit)",
        m.entry_messages.clone(),
    );
    r.register(
        "sluice_raft_commit_index",
        "the last log index known committed on this node",
        m.commit_index.clone(),
    );
    r.register_collector(Box::new(ctl.traffic.queue_counters.clone()));
    r.register_collector(Box::new(ctl.traffic.vmta_counters.clone()));
    r.register_collector(Box::new(StateCollector { ctl: ctl.clone() }));
    r
}

/// Raft and queue figures, read when scraped.
struct StateCollector {
    ctl: Arc<Controller>,
}

impl std::fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StateCollector(node {})", self.ctl.id)
    }
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(v);
    let me = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    g.encode(me)
}

impl Collector for StateCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = self.ctl.raft.metrics().borrow().clone();
        let leader = m.current_leader == Some(self.ctl.id);
        gauge(
            &mut e,
            "sluice_raft_term",
            "current Raft term",
            m.current_term as i64,
        )?;
        gauge(
            &mut e,
            "sluice_raft_is_leader",
            "1 on the leader",
            leader as i64,
        )?;
        gauge(
            &mut e,
            "sluice_raft_last_log_index",
            "the last index in this node's log",
            m.last_log_index.unwrap_or(0) as i64,
        )?;
        let applied = m.last_applied.map_or(0, |l| l.index);
        gauge(
            &mut e,
            "sluice_raft_applied_index",
            "the last log index applied to the queue state",
            applied as i64,
        )?;
        if let Some(rep) = &m.replication {
            let last = m.last_log_index.unwrap_or(0);
            let mut me = e.encode_descriptor(
                "sluice_raft_follower_lag_entries",
                "entries a follower's log is behind the leader's (leader only)",
                None,
                MetricType::Gauge,
            )?;
            for (id, matched) in rep.iter() {
                if *id == self.ctl.id {
                    continue;
                }
                let lag = last.saturating_sub(matched.map_or(0, |l| l.index));
                let labels = [("follower", id.to_string())];
                ConstGauge::new(lag as i64).encode(me.encode_family(&labels)?)?;
            }
        }
        let (msgs, rcpts) = {
            let st = self.ctl.state.lock().unwrap_or_else(|e| e.into_inner());
            (st.index.messages(), st.queued_recipients())
        };
        gauge(
            &mut e,
            "sluice_queue_messages",
            "messages stored (with a recipient still queued)",
            msgs as i64,
        )?;
        gauge(
            &mut e,
            "sluice_queue_recipients",
            "recipients queued",
            rcpts as i64,
        )
    }
}
