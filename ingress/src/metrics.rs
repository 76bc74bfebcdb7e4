//! What ingress counts for Prometheus (`/metrics`, see `docs/metrics.md`).

use std::sync::LazyLock;

use sluice_common::metrics::{
    Counter, Family, Histogram, Label, Registry, label, seconds_histogram,
};

pub struct IngressMetrics {
    pub connections: Counter,
    /// By `result`: ok, failed.
    pub tls: Family<Label, Counter>,
    pub auth_failures: Counter,
    /// SMTP replies by `class` (2xx, 4xx, ...), the last line of each.
    pub replies: Family<Label, Counter>,
    pub messages: Counter,
    pub recipients: Counter,
    pub bytes: Counter,
    /// From handing a message to the enqueuer to the leader's commit.
    pub enqueue_seconds: Histogram,
}

pub static METRICS: LazyLock<IngressMetrics> = LazyLock::new(|| IngressMetrics {
    connections: Counter::default(),
    tls: Family::default(),
    auth_failures: Counter::default(),
    replies: Family::default(),
    messages: Counter::default(),
    recipients: Counter::default(),
    bytes: Counter::default(),
    enqueue_seconds: seconds_histogram(),
});

impl IngressMetrics {
    pub fn registry(&self) -> Registry {
        // Known series start at 0, so that a rate over them exists before the first event.
        for r in ["ok", "failed"] {
            let _ = self.tls.get_or_create(&label("result", r));
        }
        for c in ["2xx", "3xx", "4xx", "5xx"] {
            let _ = self.replies.get_or_create(&label("class", c));
        }
        let mut r = Registry::with_prefix("sluice_ingress");
        r.register(
            "connections",
            "SMTP connections accepted",
            self.connections.clone(),
        );
        r.register(
            "tls_handshakes",
            "TLS handshakes (STARTTLS and implicit), by result",
            self.tls.clone(),
        );
        r.register(
            "auth_failures",
            "AUTH attempts answered 535",
            self.auth_failures.clone(),
        );
        r.register("replies", "SMTP replies by class", self.replies.clone());
        r.register(
            "messages_accepted",
            "messages committed and answered 250 (SMTP and HTTP)",
            self.messages.clone(),
        );
        r.register(
            "recipients_accepted",
            "recipients of committed messages",
            self.recipients.clone(),
        );
        r.register(
            "bytes_received",
            "bytes of committed messages",
            self.bytes.clone(),
        );
        r.register(
            "enqueue_seconds",
            "time from a message's end of data to its commit on a majority",
            self.enqueue_seconds.clone(),
        );
        r
    }
}
