//! What a worker counts for Prometheus (`/metrics`, see `docs/metrics.md`).

use std::sync::LazyLock;

use sluice_common::metrics::{
    Counter, Family, Histogram, Label, Registry, label, seconds_histogram,
};

pub struct WorkerMetrics {
    /// Connection attempts by `outcome`: ok, refused (greeting not 2xx), timeout, failed.
    pub connections: Family<Label, Counter>,
    pub tls_sessions: Counter,
    /// Replies read from receivers, by `class`.
    pub replies: Family<Label, Counter>,
    /// Recipients by `source_ip` and what the receiver said: accepted, deferred, rejected.
    pub recipients: Family<Vec<(&'static str, String)>, Counter>,
    pub dkim_sign_seconds: Histogram,
    /// One message's transaction, from MAIL to the reply to its final dot.
    pub delivery_seconds: Histogram,
}

pub static METRICS: LazyLock<WorkerMetrics> = LazyLock::new(|| WorkerMetrics {
    connections: Family::default(),
    tls_sessions: Counter::default(),
    replies: Family::default(),
    recipients: Family::default(),
    dkim_sign_seconds: seconds_histogram(),
    delivery_seconds: seconds_histogram(),
});

impl WorkerMetrics {
    pub fn connection(&self, outcome: &'static str) {
        self.connections
            .get_or_create(&label("outcome", outcome))
            .inc();
    }

    pub fn reply(&self, code: u16) {
        self.replies
            .get_or_create(&label("class", sluice_common::metrics::reply_class(code)))
            .inc();
    }

    /// A recipient's result as this worker saw it (the leader decides retry or bounce).
    pub fn recipient(&self, source_ip: &str, code: u32) {
        let outcome = match code / 100 {
            2 => "accepted",
            5 => "rejected",
            _ => "deferred",
        };
        self.recipients
            .get_or_create(&vec![
                ("source_ip", source_ip.to_string()),
                ("outcome", outcome.to_string()),
            ])
            .inc();
    }

    pub fn registry(&self) -> Registry {
        // Known series start at 0, so that a rate over them exists before the first event.
        for o in ["ok", "refused", "timeout", "failed"] {
            let _ = self.connections.get_or_create(&label("outcome", o));
        }
        for c in ["2xx", "3xx", "4xx", "5xx"] {
            let _ = self.replies.get_or_create(&label("class", c));
        }
        let mut r = Registry::with_prefix("sluice_worker");
        r.register(
            "connections",
            "connection attempts to receivers, by outcome",
            self.connections.clone(),
        );
        r.register(
            "tls_sessions",
            "STARTTLS sessions established",
            self.tls_sessions.clone(),
        );
        r.register(
            "replies",
            "replies read from receivers, by class",
            self.replies.clone(),
        );
        r.register(
            "recipients",
            "recipients by source IP and the receiver's answer",
            self.recipients.clone(),
        );
        r.register(
            "dkim_sign_seconds",
            "time to DKIM-sign one message",
            self.dkim_sign_seconds.clone(),
        );
        r.register(
            "delivery_seconds",
            "one message's SMTP transaction, MAIL to the final dot's reply",
            self.delivery_seconds.clone(),
        );
        r
    }
}
