//! HTTP injection: `POST /api/inject/v1` with JSON. Answers only after the commit, with the
//! acceptance of each recipient. See docs/http-injection.md.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use sluice_common::policy::AccessLevel;
use sluice_common::settings::IngressSettings;
use sluice_proto::queue::{NewMessage, Recipient};
use tokio::net::TcpListener;

use crate::Shared;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InjectRequest {
    pub envelope_sender: String,
    pub recipients: Vec<String>,
    /// The complete RFC 5322 message. Either this or `message`.
    #[serde(default)]
    pub content: Option<String>,
    #[serde(default)]
    pub message: Option<SimpleMessage>,
    /// VMTA or pool; otherwise the source's routing applies.
    #[serde(default)]
    pub vmta: Option<String>,
    #[serde(default)]
    pub job_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimpleMessage {
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub html: Option<String>,
}

#[derive(Serialize)]
pub struct RecipientResult {
    pub recipient: String,
    pub accepted: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Serialize)]
pub struct InjectReply {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub recipients: Vec<RecipientResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// How this node's HTTP injection guards itself (from the settings).
pub struct HttpGuard {
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub require_auth: bool,
    /// NAME -> argon2 hash, from `ingress.http_users_file`.
    pub users: HashMap<String, String>,
    pub max_body: usize,
    pub max_recipients: usize,
    pub max_headers: usize,
    pub read_timeout: Duration,
    pub max_connections: usize,
}

impl HttpGuard {
    pub fn from_settings(s: &IngressSettings, listen: SocketAddr) -> Result<HttpGuard, String> {
        let tls = match (&s.http_tls_cert, &s.http_tls_key) {
            (Some(c), Some(k)) => Some(crate::smtp::conn::tls_acceptor(c, k)?),
            (None, None) => None,
            _ => return Err("settings: ingress.http_tls_cert and http_tls_key go together".into()),
        };
        let users = match &s.http_users_file {
            Some(f) => read_users(f)?,
            None => HashMap::new(),
        };
        Ok(HttpGuard {
            tls,
            require_auth: s.http_require_auth.unwrap_or(!listen.ip().is_loopback()),
            users,
            max_body: s.http_max_body_bytes as usize,
            max_recipients: s.http_max_recipients as usize,
            max_headers: s.http_max_headers as usize,
            read_timeout: Duration::from_millis(s.http_read_timeout_ms),
            max_connections: s.http_max_connections.max(1) as usize,
        })
    }
}

/// `NAME ARGON2-HASH` lines; `#` starts a comment.
fn read_users(path: &std::path::Path) -> Result<HashMap<String, String>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut users = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut parts = line.split_whitespace();
        let (Some(name), Some(hash), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!("{}:{}: expected NAME HASH", path.display(), i + 1));
        };
        sluice_common::policy::secrets::check_hash(hash)
            .map_err(|e| format!("{}:{}: {e}", path.display(), i + 1))?;
        users.insert(name.to_string(), hash.to_string());
    }
    Ok(users)
}

pub async fn serve(listener: TcpListener, shared: Arc<Shared>, guard: Arc<HttpGuard>) {
    let app = Router::new()
        .route("/api/inject/v1", post(inject))
        .with_state((shared, guard.clone()));
    let open = Arc::new(tokio::sync::Semaphore::new(guard.max_connections));
    loop {
        let (sock, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("HTTP accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            // Over the connection cap: a short answer, never a queue of waiting sockets.
            let _ = sock.try_write(
                b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nRetry-After: 5\r\nContent-Length: 0\r\n\r\n",
            );
            continue;
        };
        let app = app.clone();
        let guard = guard.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let io: sluice_common::stream::MaybeTls<
                tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
            > = match &guard.tls {
                None => sluice_common::stream::MaybeTls::Plain(sock),
                Some(acceptor) => {
                    match tokio::time::timeout(guard.read_timeout, acceptor.accept(sock)).await {
                        Ok(Ok(s)) => sluice_common::stream::MaybeTls::Tls(Box::new(s)),
                        _ => return,
                    }
                }
            };
            let svc = hyper::service::service_fn(
                move |mut req: axum::extract::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(ConnectInfo(peer));
                    let mut app = app.clone();
                    async move {
                        use tower::Service;
                        app.call(req.map(axum::body::Body::new)).await
                    }
                },
            );
            // Headers must arrive within the read timeout (a slow client cannot hold a
            // connection open by trickling them).
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(guard.read_timeout)
                .max_buf_size(64 << 10)
                .serve_connection(hyper_util::rt::TokioIo::new(io), svc);
            let _ = conn.await;
        });
    }
}

/// Who the request authenticates as, from `Authorization` (Basic, or Bearer NAME.SECRET).
async fn authenticate(shared: &Shared, guard: &HttpGuard, headers: &HeaderMap) -> Option<String> {
    use base64::Engine;
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (name, secret) = if let Some(b) = value.strip_prefix("Basic ") {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b.trim())
            .ok()?;
        let text = String::from_utf8(raw).ok()?;
        let (n, p) = text.split_once(':')?;
        (n.to_string(), p.to_string())
    } else if let Some(t) = value.strip_prefix("Bearer ") {
        let (n, p) = t.trim().split_once('.')?;
        (n.to_string(), p.to_string())
    } else {
        return None;
    };
    let hash = guard.users.get(&name).cloned();
    let policy = shared.policy();
    let who = name.clone();
    // argon2 costs tens of milliseconds: off the async threads.
    let ok = tokio::task::spawn_blocking(move || match hash {
        Some(h) => sluice_common::policy::secrets::verify(&h, &secret),
        None => policy.check_user(&who, &secret).is_some(),
    })
    .await
    .unwrap_or(false);
    ok.then_some(name)
}

fn error(code: StatusCode, msg: impl Into<String>) -> (StatusCode, Json<InjectReply>) {
    (
        code,
        Json(InjectReply {
            id: None,
            recipients: Vec::new(),
            error: Some(msg.into()),
        }),
    )
}

/// Builds a message from headers and text/html parts.
fn build(m: &SimpleMessage, from: &str, hostname: &str) -> Result<Vec<u8>, String> {
    let mut out = String::new();
    let has = |n: &str| m.headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(n));
    for (k, v) in &m.headers {
        if k.contains([':', '\r', '\n']) || v.contains(['\r', '\n']) {
            return Err(format!("header `{k}` holds a line break or colon"));
        }
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    if !has("From") {
        out.push_str(&format!("From: <{from}>\r\n"));
    }
    if !has("Date") {
        out.push_str(&format!(
            "Date: {}\r\n",
            chrono::Local::now().format("%a, %d %b %Y %H:%M:%S %z")
        ));
    }
    if !has("Message-ID") {
        out.push_str(&format!(
            "Message-ID: <{:016x}@{hostname}>\r\n",
            fastrand::u64(..)
        ));
    }
    out.push_str("MIME-Version: 1.0\r\n");
    let crlf = |s: &str| s.replace("\r\n", "\n").replace('\n', "\r\n");
    match (&m.text, &m.html) {
        (Some(t), Some(h)) => {
            let b = format!("=_sluice_{:016x}", fastrand::u64(..));
            out.push_str(&format!("Content-Type: multipart/alternative; boundary=\"{b}\"\r\n\r\n"));
            out.push_str(&format!("--{b}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n{}\r\n", crlf(t)));
            out.push_str(&format!("--{b}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n{}\r\n", crlf(h)));
            out.push_str(&format!("--{b}--\r\n"));
        }
        (Some(t), None) => out.push_str(&format!("Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n{}\r\n", crlf(t))),
        (None, Some(h)) => out.push_str(&format!("Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n{}\r\n", crlf(h))),
        (None, None) => return Err("the message needs `text` or `html`".into()),
    }
    Ok(out.into_bytes())
}

async fn inject(
    State((shared, guard)): State<(Arc<Shared>, Arc<HttpGuard>)>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    // Who may inject is settled before a byte of the body is read.
    let policy = shared.policy();
    let source = policy.source_for_ip(peer.ip());
    let level = policy.http_access_for(peer.ip());
    let allowed = matches!(level, Some(AccessLevel::Admin) | Some(AccessLevel::Inject))
        || source.always_allow_api_submission == Some(true);
    if !allowed {
        shared.reject(peer, 'c', "HTTP injection not allowed for this address");
        return error(
            StatusCode::FORBIDDEN,
            "injection is not allowed from your address (http-access / always-allow-api-submission)",
        )
        .into_response();
    }
    if guard.require_auth && authenticate(&shared, &guard, &headers).await.is_none() {
        shared.reject(peer, 'c', "HTTP injection without valid credentials");
        let mut r = error(
            StatusCode::UNAUTHORIZED,
            "authenticate with HTTP basic auth or `Authorization: Bearer NAME.SECRET`",
        )
        .into_response();
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Basic realm=\"sluice\""),
        );
        return r;
    }
    let length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(n) = length
        && n > guard.max_body
    {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is larger than {} bytes", guard.max_body),
        )
        .into_response();
    }
    // The body, the decoded JSON and the message made from it: three times the body at most.
    let mut share = crate::memory::Reservation::new(&shared.bytes_in_flight);
    if !share.cover(length.unwrap_or(guard.max_body) as u64 * 3) {
        shared.reject(peer, 'c', "max_bytes_in_flight reached for HTTP injection");
        let mut r = error(
            StatusCode::SERVICE_UNAVAILABLE,
            "insufficient system resources; try again later",
        )
        .into_response();
        r.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
        return r;
    }
    let bytes = match tokio::time::timeout(
        guard.read_timeout,
        axum::body::to_bytes(body, guard.max_body),
    )
    .await
    {
        Ok(Ok(b)) => b,
        Ok(Err(_)) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is larger than {} bytes", guard.max_body),
            )
            .into_response();
        }
        Err(_) => {
            return error(StatusCode::REQUEST_TIMEOUT, "the body was not sent in time")
                .into_response();
        }
    };
    let req: InjectRequest = match serde_json::from_slice(&bytes) {
        Ok(r) => r,
        Err(e) => {
            return error(StatusCode::BAD_REQUEST, format!("bad JSON: {e}")).into_response();
        }
    };
    if req.recipients.len() > guard.max_recipients {
        return error(
            StatusCode::BAD_REQUEST,
            format!("more than {} recipients", guard.max_recipients),
        )
        .into_response();
    }
    if req
        .message
        .as_ref()
        .is_some_and(|m| m.headers.len() > guard.max_headers)
    {
        return error(
            StatusCode::BAD_REQUEST,
            format!("more than {} headers", guard.max_headers),
        )
        .into_response();
    }
    let reply = inject_checked(shared, peer, policy, source, req).await;
    drop(share);
    reply.into_response()
}

async fn inject_checked(
    shared: Arc<Shared>,
    peer: SocketAddr,
    policy: Arc<sluice_common::policy::Policy>,
    source: sluice_common::policy::SourceSettings,
    req: InjectRequest,
) -> (StatusCode, Json<InjectReply>) {
    if req.recipients.is_empty() {
        return error(StatusCode::BAD_REQUEST, "`recipients` is empty");
    }
    if !req.envelope_sender.is_empty()
        && crate::smtp::command::check_mailbox(&req.envelope_sender, true).is_err()
    {
        return error(
            StatusCode::BAD_REQUEST,
            "`envelope_sender` is not a valid address",
        );
    }
    let raw = match (&req.content, &req.message) {
        (Some(c), None) => c.replace("\r\n", "\n").replace('\n', "\r\n").into_bytes(),
        (None, Some(m)) => match build(m, &req.envelope_sender, &shared.hostname) {
            Ok(b) => b,
            Err(e) => return error(StatusCode::BAD_REQUEST, e),
        },
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "give exactly one of `content` and `message`",
            );
        }
    };
    let mut results = Vec::new();
    let mut accepted = Vec::new();
    let refuse_suppressed =
        policy.global.suppressed_recipients != Some(sluice_common::policy::SuppressAction::Bounce);
    let now = crate::suppress::now_ms();
    for r in &req.recipients {
        let suppressed = refuse_suppressed
            .then(|| shared.suppressions.check(r, now))
            .flatten();
        match crate::smtp::command::check_mailbox(r, true) {
            Ok(()) if suppressed.is_some() => results.push(RecipientResult {
                recipient: r.clone(),
                accepted: false,
                reason: Some(format!(
                    "550 5.7.1 the recipient is on the suppression list ({})",
                    suppressed.unwrap_or_default()
                )),
            }),
            Ok(()) => {
                accepted.push(Recipient {
                    address: r.clone(),
                    orcpt: String::new(),
                    notify: 0,
                });
                results.push(RecipientResult {
                    recipient: r.clone(),
                    accepted: true,
                    reason: None,
                });
            }
            Err(why) => results.push(RecipientResult {
                recipient: r.clone(),
                accepted: false,
                reason: Some(why.into()),
            }),
        }
    }
    if accepted.is_empty() {
        return (
            StatusCode::BAD_REQUEST,
            Json(InjectReply {
                id: None,
                recipients: results,
                error: Some("no valid recipient".into()),
            }),
        );
    }
    let local = SocketAddr::from(([127, 0, 0, 1], 0));
    let prepared = match crate::message::prepare(
        raw,
        &crate::message::Context {
            policy: &policy,
            source: &source,
            helo: "http",
            peer,
            local,
            hostname: &shared.hostname,
            protocol: "HTTP",
            mail_from: &req.envelope_sender,
            first_rcpt: &accepted[0].address,
            envid: "",
        },
    ) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::UNPROCESSABLE_ENTITY, e),
    };
    let vmta = match &req.vmta {
        Some(v) if policy.target(v).is_none() => {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("`{v}` is not a virtual-mta or pool of this cluster"),
            );
        }
        Some(v) => v.clone(),
        None => prepared.vmta,
    };
    let msg = NewMessage {
        mail_from: req.envelope_sender.clone(),
        recipients: accepted,
        envid: prepared.envid,
        ret: String::new(),
        vmta,
        job_id: req.job_id.clone().unwrap_or(prepared.job_id),
        received_by: shared.node_name.clone(),
        client_ip: peer.ip().to_string(),
        priority: 0,
        body: prepared.body.into(),
        token: Default::default(),
        verp: false,
    };
    match shared.enqueuer.enqueue(msg).await {
        Ok(id) => (
            StatusCode::OK,
            Json(InjectReply {
                id: Some(format!("{id:016x}")),
                recipients: results,
                error: None,
            }),
        ),
        Err(e) => error(
            StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            format!("not committed: {}", e.smtp_reply()),
        ),
    }
}
