//! HTTP injection: `POST /api/inject/v1` with JSON. Answers only after the commit, with the
//! acceptance of each recipient. See docs/http-injection.md.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use sluice_common::policy::AccessLevel;
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

pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let app = Router::new()
        .route("/api/inject/v1", post(inject))
        .with_state(shared);
    if let Err(e) = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await
    {
        tracing::error!("HTTP server stopped: {e}");
    }
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
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Json(req): Json<InjectRequest>,
) -> (StatusCode, Json<InjectReply>) {
    let policy = shared.policy();
    let source = policy.source_for_ip(peer.ip());
    let level = policy
        .http_access
        .iter()
        .filter(|a| a.cidr.contains(&peer.ip()))
        .max_by_key(|a| a.cidr.prefix_len())
        .map(|a| a.level);
    let allowed = matches!(level, Some(AccessLevel::Admin) | Some(AccessLevel::Inject))
        || source.always_allow_api_submission == Some(true);
    if !allowed {
        shared.reject(peer, 'c', "HTTP injection not allowed for this address");
        return error(
            StatusCode::FORBIDDEN,
            "injection is not allowed from your address (http-access / always-allow-api-submission)",
        );
    }
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
    for r in &req.recipients {
        match crate::smtp::command::check_mailbox(r, true) {
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
