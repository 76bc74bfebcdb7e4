//! The web monitor (PowerMTA's `http-mgmt-port` page), served by every controller beside
//! `/metrics`. Cluster-wide views come from the leader over the Admin API, with this
//! controller's certificate; `http-access` decides who may look (`monitor`) and who may also
//! pause and resume queues (`admin`). The page is one self-contained file: no CDN, no fonts.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use serde_json::{Value, json};
use sluice_common::policy::AccessLevel;
use sluice_proto::LeaderClient;
use sluice_proto::admin::admin_client::AdminClient;
use sluice_proto::admin::*;

use crate::node::Controller;

/// How long the monitor waits for the leader.
const LEADER_WAIT: Duration = Duration::from_secs(3);
/// Queues listed on the page (the largest first).
const MAX_QUEUES: usize = 100;

/// Who may do what from a client address: the most specific `http-access` rule; without one,
/// loopback may look and others may not.
fn level(ctl: &Controller, peer: SocketAddr) -> AccessLevel {
    let ip = peer.ip().to_canonical();
    let policy = ctl.policy();
    match policy.policy.http_access_for(ip) {
        Some(l) => l,
        None if ip.is_loopback() => AccessLevel::Monitor,
        None => AccessLevel::None,
    }
}

/// Whether the page was asked for under a name this controller answers to: an IP address,
/// `localhost` or `metrics.monitor_hosts`. Access is by client address, so a page elsewhere
/// whose name was rebound to this controller must not be served.
fn host_allowed(ctl: &Controller, headers: &HeaderMap) -> bool {
    let Some(host) = headers.get("host").and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.parse::<std::net::IpAddr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || ctl
            .settings
            .metrics
            .monitor_hosts
            .iter()
            .any(|h| h.eq_ignore_ascii_case(name))
}

/// Who may look, or why not.
fn admit(
    ctl: &Controller,
    peer: SocketAddr,
    headers: &HeaderMap,
) -> Result<AccessLevel, &'static str> {
    if !host_allowed(ctl, headers) {
        return Err(
            "this monitor answers to IP addresses, localhost and metrics.monitor_hosts only",
        );
    }
    let l = level(ctl, peer);
    if !may_read(l) {
        return Err("http-access does not let this address see the monitor");
    }
    Ok(l)
}

fn may_read(l: AccessLevel) -> bool {
    matches!(l, AccessLevel::Monitor | AccessLevel::Admin)
}

fn forbidden(why: &str) -> Response {
    (StatusCode::FORBIDDEN, format!("{why}\n")).into_response()
}

/// The leader's Admin API, reached from this controller.
fn leader(ctl: &Controller) -> LeaderClient {
    let m = ctl.raft.metrics().borrow().clone();
    let mut addrs: Vec<String> = m
        .membership_config
        .membership()
        .nodes()
        .map(|(_, n)| n.addr.clone())
        .collect();
    if addrs.is_empty() {
        addrs.push(ctl.addr.clone());
    }
    LeaderClient::new(addrs)
}

macro_rules! ask {
    ($client:expr, |$c:ident| $call:expr) => {{
        let deadline = tokio::time::Instant::now() + LEADER_WAIT;
        $client
            .call(deadline, |ch| {
                let mut $c = AdminClient::new(ch);
                async move { $call.await }
            })
            .await
    }};
}

fn traffic(t: &Option<Traffic>) -> Value {
    let t = t.unwrap_or_default();
    json!({"received": t.received, "delivered": t.delivered, "deferred": t.deferred, "bounced": t.bounced})
}

/// The last overview and when it was made: page loads and refreshes within
/// [`OVERVIEW_FRESH`] share one set of calls to the leader.
static OVERVIEW: std::sync::Mutex<Option<(tokio::time::Instant, Value)>> =
    std::sync::Mutex::new(None);
const OVERVIEW_FRESH: Duration = Duration::from_secs(2);

/// Everything the page shows, from the leader (shared for [`OVERVIEW_FRESH`]).
async fn overview(ctl: &Controller, admin: bool) -> Value {
    let cached = OVERVIEW
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .filter(|(at, _)| at.elapsed() < OVERVIEW_FRESH)
        .map(|(_, v)| v.clone());
    let mut v = match cached {
        Some(v) => v,
        None => {
            let v = fetch_overview(ctl).await;
            *OVERVIEW.lock().unwrap_or_else(|e| e.into_inner()) =
                Some((tokio::time::Instant::now(), v.clone()));
            v
        }
    };
    v["admin"] = json!(admin);
    v
}

async fn fetch_overview(ctl: &Controller) -> Value {
    let client = leader(ctl);
    let status = ask!(client, |c| c.status(Empty {}));
    let queues = ask!(client, |c| c.queues(Empty {}));
    let vmtas = ask!(client, |c| c.vmtas(Empty {}));
    let workers = ask!(client, |c| c.workers(Empty {}));
    let mut errors = Vec::new();
    let mut note = |what: &str, e: &tonic::Status| errors.push(format!("{what}: {}", e.message()));
    let status = status.inspect_err(|e| note("status", e)).ok();
    let queues = queues.inspect_err(|e| note("queues", e)).ok();
    let vmtas = vmtas.inspect_err(|e| note("vmtas", e)).ok();
    let workers = workers.inspect_err(|e| note("workers", e)).ok();
    let cluster = status.as_ref().map(|s| {
        json!({
            "leader_id": s.leader_id, "leader_addr": s.leader_addr, "term": s.term,
            "policy_version": format!("{:016x}", s.policy_version),
            "queued_messages": s.queued_messages, "queued_recipients": s.queued_recipients,
            "members": s.nodes.iter().map(|n| json!({
                "node_id": n.node_id, "addr": n.addr, "voter": n.voter,
                "role": if n.node_id == s.leader_id { "leader" } else if n.voter { "voter" } else { "learner" },
                "lag": if n.lag == u64::MAX { Value::Null } else { json!(n.lag) },
            })).collect::<Vec<_>>(),
            "traffic": {"last_minute": traffic(&s.last_minute), "last_hour": traffic(&s.last_hour)},
            "ingress": s.peers.iter().filter_map(|p| p.node.strip_prefix("ingress ").map(|n| json!({
                "name": n, "policy_version": format!("{:016x}", p.policy_version),
                "last_seen_s_ago": p.last_seen_ms_ago / 1000,
            }))).collect::<Vec<_>>(),
            "workerless": s.workerless.iter().map(|w| json!({
                "queue": format!("{}/{}", w.queue, w.vmta), "recipients": w.recipients,
            })).collect::<Vec<_>>(),
        })
    });
    let mut qs: Vec<&QueueInfo> = queues
        .as_ref()
        .map_or(Vec::new(), |q| q.queues.iter().collect());
    // Top domains over every queue, before the list is cut.
    let mut domains: std::collections::HashMap<&str, (u64, u32, u64, u64)> = Default::default();
    for q in &qs {
        let d = domains.entry(q.queue.as_str()).or_default();
        d.0 += q.recipients;
        d.1 += q.connections;
        d.2 = d.2.max(q.oldest_age_s);
        d.3 += q.last_hour.map_or(0, |t| t.delivered);
    }
    let mut domains: Vec<_> = domains.into_iter().collect();
    domains.sort_by(|a, b| b.1.0.cmp(&a.1.0).then(a.0.cmp(b.0)));
    domains.truncate(10);
    qs.sort_by_key(|q| std::cmp::Reverse(q.recipients));
    let queue_count = qs.len();
    qs.truncate(MAX_QUEUES);
    json!({
        "node_id": ctl.id,
        "domains": domains.iter().map(|(d, (r, c, o, dl))| json!({
            "domain": d, "recipients": r, "connections": c, "oldest_age_s": o, "delivered": dl,
        })).collect::<Vec<_>>(),
        "errors": errors,
        "cluster": cluster,
        "queues": qs.iter().map(|q| json!({
            "queue": format!("{}/{}", q.queue, q.vmta), "domain": q.queue, "mode": q.mode,
            "recipients": q.recipients, "oldest_age_s": q.oldest_age_s,
            "connections": q.connections, "max_connections": q.max_connections,
            "rate": format!("{}/h of {}", q.rate_used, q.rate_allowed),
            "last_error": q.last_error, "last_hour": traffic(&q.last_hour),
        })).collect::<Vec<_>>(),
        "queue_count": queue_count,
        "vmtas": vmtas.map_or(Vec::new(), |v| v.vmtas.iter().map(|v| json!({
            "name": v.name, "source_ip": v.source_ip, "state": v.state,
            "recipients": v.recipients, "connections": v.connections,
            "last_hour": traffic(&v.last_hour), "pools": v.pools,
        })).collect()),
        "workers": workers.map_or(Vec::new(), |w| w.workers.iter().map(|w| json!({
            "name": w.name, "live": w.live, "source_ips": w.source_ips,
            "capacity": w.capacity, "leases": w.leases,
            "policy_version": format!("{:016x}", w.policy_version),
            "last_seen_s_ago": w.last_seen_ms_ago / 1000,
        })).collect()),
    })
}

async fn page(
    State(ctl): State<Arc<Controller>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    let l = match admit(&ctl, peer, &headers) {
        Ok(l) => l,
        Err(why) => return forbidden(why),
    };
    let data = overview(&ctl, l == AccessLevel::Admin).await;
    // The first view is in the page itself, so it shows without a second request. Reply
    // texts come from remote servers: no `<`, `>` or `&` may reach the HTML parser.
    let embedded = data
        .to_string()
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026");
    let nonce = match nonce() {
        Some(n) => n,
        None => {
            return (StatusCode::INTERNAL_SERVER_ERROR, "no random source\n").into_response();
        }
    };
    let html = PAGE
        .replace("/*DATA*/null", &embedded)
        .replace("<script>", &format!("<script nonce=\"{nonce}\">"));
    let csp = format!(
        "default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; \
         connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    );
    (
        [
            ("content-security-policy", csp),
            ("x-frame-options", "DENY".to_string()),
            ("cache-control", "no-store".to_string()),
        ],
        Html(html),
    )
        .into_response()
}

async fn api_overview(
    State(ctl): State<Arc<Controller>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    let l = match admit(&ctl, peer, &headers) {
        Ok(l) => l,
        Err(why) => return forbidden(why),
    };
    Json(overview(&ctl, l == AccessLevel::Admin).await).into_response()
}

#[derive(serde::Deserialize)]
struct QueueAction {
    /// DOMAIN/VMTA.
    queue: String,
    /// "pause" or "resume".
    action: String,
}

async fn api_queue(
    State(ctl): State<Arc<Controller>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Json(a): Json<QueueAction>,
) -> Response {
    match admit(&ctl, peer, &headers) {
        Ok(AccessLevel::Admin) => {}
        Ok(_) => return forbidden("only an http-access admin address may pause or resume"),
        Err(why) => return forbidden(why),
    }
    // A header a cross-site form cannot send: a page elsewhere cannot act through a browser.
    if headers.get("x-sluice-monitor").is_none() {
        return forbidden("missing X-Sluice-Monitor header");
    }
    let client = leader(&ctl);
    let sel = QueueSelector { pattern: a.queue };
    let sel = &sel;
    let r = match a.action.as_str() {
        "pause" => ask!(client, |c| c.pause(sel.clone())),
        "resume" => ask!(client, |c| c.resume(sel.clone())),
        other => {
            return (
                StatusCode::BAD_REQUEST,
                format!("action `{other}`: pause or resume\n"),
            )
                .into_response();
        }
    };
    match r {
        Ok(n) => {
            // The next view shows the change.
            *OVERVIEW.lock().unwrap_or_else(|e| e.into_inner()) = None;
            Json(json!({"count": n.count})).into_response()
        }
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{}\n", e.message()),
        )
            .into_response(),
    }
}

/// A CSP nonce from the system's random source.
fn nonce() -> Option<String> {
    use std::io::Read;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .ok()?;
    Some(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// The monitor's routes, to merge with `/metrics`.
pub fn router(ctl: Arc<Controller>) -> axum::Router {
    axum::Router::new()
        .route("/", axum::routing::get(page))
        .route("/api/overview", axum::routing::get(api_overview))
        .route("/api/queue", axum::routing::post(api_queue))
        .with_state(ctl)
}

const PAGE: &str = include_str!("monitor.html");
