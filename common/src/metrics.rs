//! Prometheus metrics. Each role registers its own in a [`Registry`] and serves it as text on
//! `/metrics` at `metrics.listen`. Label values are bounded: a per-queue family keeps series
//! for at most `metrics.top_queues` queues and sums the rest into `other`.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

pub use prometheus_client;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
pub use prometheus_client::metrics::counter::Counter;
pub use prometheus_client::metrics::family::Family;
pub use prometheus_client::metrics::gauge::Gauge;
pub use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
pub use prometheus_client::registry::Registry;

/// One label, for families keyed by a single value (`class`, `outcome`, ...).
pub type Label = Vec<(&'static str, String)>;

pub fn label(key: &'static str, value: impl Into<String>) -> Label {
    vec![(key, value.into())]
}

/// `2xx`, `4xx`, ... for a reply code.
pub fn reply_class(code: u16) -> &'static str {
    match code / 100 {
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        5 => "5xx",
        _ => "other",
    }
}

/// A histogram of durations in seconds, 1 ms to about 33 s.
pub fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// Counters per (key, outcome) where keys are many and unbounded (queues, VMTAs): the first
/// `slots` keys with traffic since the process started get series of their own, later ones
/// add to `other`. A key never moves between the two, so every series only grows, as a
/// counter must.
#[derive(Debug)]
pub struct TopCounters {
    name: &'static str,
    help: &'static str,
    key: &'static str,
    slots: usize,
    inner: Mutex<TopInner>,
}

#[derive(Debug, Default)]
struct TopInner {
    own: HashMap<String, BTreeMap<&'static str, u64>>,
    other: BTreeMap<&'static str, u64>,
}

pub const OTHER: &str = "other";

impl TopCounters {
    pub fn new(name: &'static str, help: &'static str, key: &'static str, slots: usize) -> Self {
        TopCounters {
            name,
            help,
            key,
            slots,
            inner: Mutex::default(),
        }
    }

    pub fn add(&self, key: &str, outcome: &'static str, n: u64) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let inner = &mut *g;
        if let Some(m) = inner.own.get_mut(key) {
            *m.entry(outcome).or_default() += n;
        } else if inner.own.len() < self.slots && key != OTHER {
            inner
                .own
                .insert(key.to_string(), BTreeMap::from([(outcome, n)]));
        } else {
            *inner.other.entry(outcome).or_default() += n;
        }
    }
}

impl Collector for TopCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let rows: Vec<(String, &'static str, u64)> = {
            let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            let mut rows: Vec<_> = g
                .own
                .iter()
                .flat_map(|(k, m)| m.iter().map(move |(o, v)| (k.clone(), *o, *v)))
                .chain(g.other.iter().map(|(o, v)| (OTHER.to_string(), *o, *v)))
                .collect();
            rows.sort();
            rows
        };
        let mut metric =
            encoder.encode_descriptor(self.name, self.help, None, MetricType::Counter)?;
        for (key, outcome, v) in rows {
            let labels = [(self.key, key.as_str()), ("outcome", outcome)];
            let series = metric.encode_family(&labels)?;
            ConstCounter::new(v).encode(series)?;
        }
        Ok(())
    }
}

/// The registry's metrics as OpenMetrics text.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, registry).is_err() {
        out.clear();
    }
    out
}

/// A router answering `GET /metrics`; roles add their own pages to it.
pub fn router(registry: Arc<Registry>) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let registry = registry.clone();
            async move {
                (
                    [(
                        "content-type",
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    render(&registry),
                )
            }
        }),
    )
}

/// Binds the metrics address (before a node gives up root) and serves `router` on it.
pub async fn serve(addr: SocketAddr, router: axum::Router) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    serve_on(listener, router);
    Ok(())
}

/// Serves `router` on a bound listener.
pub fn serve_on(listener: tokio::net::TcpListener, router: axum::Router) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "metrics listening");
    }
    tokio::spawn(async move {
        let service = router.into_make_service_with_connect_info::<SocketAddr>();
        if let Err(e) = axum::serve(listener, service).await {
            tracing::warn!("metrics server stopped: {e}");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_counters_keep_their_series_and_sum_the_rest_into_other() {
        let t = TopCounters::new("sluice_test_outcomes", "test", "queue", 2);
        t.add("a", "delivered", 3);
        t.add("b", "delivered", 1);
        t.add("c", "deferred", 5);
        t.add("a", "bounced", 1);
        t.add("d", "deferred", 2);
        let mut r = Registry::default();
        r.register_collector(Box::new(t));
        let text = render(&r);
        for want in [
            "sluice_test_outcomes_total{queue=\"a\",outcome=\"bounced\"} 1",
            "sluice_test_outcomes_total{queue=\"a\",outcome=\"delivered\"} 3",
            "sluice_test_outcomes_total{queue=\"b\",outcome=\"delivered\"} 1",
            "sluice_test_outcomes_total{queue=\"other\",outcome=\"deferred\"} 7",
        ] {
            assert!(text.contains(want), "no `{want}` in\n{text}");
        }
        assert!(!text.contains("queue=\"c\""), "{text}");
    }
}
