//! Delivering one lease: route, connect (trying the next MX on failure), then one
//! transaction per message (recipients grouped up to max-rcpt-per-message), reusing the
//! connection until max-msg-per-connection, and reporting for every recipient what the
//! receiver answered and at which stage. The leader decides what the answer means.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use sluice_common::smtp::command::Cmd;
use sluice_proto::lease::{DeliverySettings, Lease, LeasedMessage, Outcome, Stage};

use crate::Worker;
use crate::mx::{Route, parse_fixed};
use crate::smtp_client::{Client, ClientError, Reply, Timeouts, dot_stuff};

/// Outcomes are reported in groups of about this many recipients.
const REPORT_EVERY: usize = 25;

/// Where the connection went, for the accounting columns.
#[derive(Default, Clone)]
struct Via {
    mx: String,
    ip: String,
    tls: Option<(String, String)>,
    esmtp: bool,
}

/// What happened at one stage: a reply, or a failure the worker describes itself.
#[derive(Debug, Clone)]
struct Seen {
    reply: Reply,
    stage: Stage,
    timed_out: bool,
    local: bool,
}

impl Seen {
    fn reply(reply: Reply, stage: Stage) -> Seen {
        Seen {
            reply,
            stage,
            timed_out: false,
            local: false,
        }
    }

    /// A reply the worker makes itself (no route, TLS required, ...).
    fn local(code: u16, enhanced: &str, text: impl Into<String>, stage: Stage) -> Seen {
        Seen {
            reply: Reply::local(code, enhanced, text),
            stage,
            timed_out: false,
            local: true,
        }
    }

    /// The connection failed at `stage`: no reply, or none in time.
    fn failed(e: &ClientError, stage: Stage) -> Seen {
        Seen {
            reply: Reply::local(451, "4.4.2", e.to_string()),
            stage,
            timed_out: matches!(e, ClientError::Timeout(_)),
            local: true,
        }
    }
}

fn outcome(msg: &LeasedMessage, index: u32, seen: &Seen, via: &Via, source: &str) -> Outcome {
    Outcome {
        message_id: msg.id,
        rcpt_index: index,
        code: seen.reply.code as u32,
        enhanced: seen.reply.enhanced.clone(),
        text: seen.reply.text.clone(),
        stage: seen.stage as i32,
        timed_out: seen.timed_out,
        local: seen.local,
        mx_host: via.mx.clone(),
        mx_ip: via.ip.clone(),
        tls_version: via.tls.as_ref().map(|t| t.0.clone()).unwrap_or_default(),
        tls_cipher: via.tls.as_ref().map(|t| t.1.clone()).unwrap_or_default(),
        source_ip: source.to_string(),
        esmtp: via.esmtp,
        dsn: false,
    }
}

/// The lease's time limits. A leader that predates a field sends 0: its one data limit
/// (`data_timeout_ms`) stands in for both data limits, else the RFC 5321 default.
fn timeouts(s: &DeliverySettings) -> Timeouts {
    let d = Timeouts::default();
    let or = |ms: u64, d: Duration| {
        if ms == 0 {
            d
        } else {
            Duration::from_millis(ms)
        }
    };
    let legacy = |ms: u64, d: Duration| or(ms, or(s.data_timeout_ms, d));
    Timeouts {
        command: or(s.command_timeout_ms, d.command),
        data_send: legacy(s.data_send_timeout_ms, d.data_send),
        data_termination: legacy(s.data_termination_timeout_ms, d.data_termination),
    }
}

/// Every recipient of the messages saw the same thing (no connection, TLS refused, ...).
fn all(msgs: &[LeasedMessage], seen: &Seen, via: &Via, source: &str) -> Vec<Outcome> {
    msgs.iter()
        .flat_map(|m| {
            m.recipients
                .iter()
                .map(move |r| outcome(m, r.index, seen, via, source))
        })
        .collect()
}

pub async fn run(worker: Arc<Worker>, lease: Lease) {
    let s = lease.settings.clone().unwrap_or_default();
    let lease_id = lease.lease_id;
    let source: IpAddr = s
        .source_ip
        .parse()
        .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
    let mut pending = lease.messages;
    tracing::info!(lease = lease_id, queue = %lease.queue, vmta = %lease.vmta, messages = pending.len(), "lease taken");
    let skips = |w: &Worker, r: &Reply| w.skips_mx(&s.smtp_pattern_list, &r.line());

    // Route; hosts taken out of use by skip-mx are passed over while another remains.
    let hosts = match resolve(&worker, &s).await {
        Ok(h) if h.iter().any(|(n, _)| !worker.is_skipped(n)) => h
            .into_iter()
            .filter(|(n, _)| !worker.is_skipped(n))
            .collect(),
        Ok(h) => h,
        Err(seen) => {
            let outs = all(&pending, &seen, &Via::default(), &s.source_ip);
            worker.report(lease_id, outs, true).await;
            return;
        }
    };
    // Connect: next host on failure, up to mx-connection-attempts.
    let attempts = s.mx_connection_attempts.max(1) as usize;
    let mut last = Seen::local(451, "4.4.1", "no host to connect to", Stage::Connect);
    let mut conn: Option<(Client, Via)> = None;
    'hosts: for (name, addrs) in hosts.iter().take(attempts) {
        for addr in addrs {
            match Client::connect(
                source,
                *addr,
                Duration::from_millis(s.connect_timeout_ms),
                Duration::from_millis(s.greeting_timeout_ms),
            )
            .await
            {
                Ok((c, greeting)) => {
                    let m = &crate::metrics::METRICS;
                    m.connection(if greeting.is_positive() {
                        "ok"
                    } else {
                        "refused"
                    });
                    if greeting.code == 421 && s.smtp_421_means_mx_unavailable {
                        last = Seen::reply(greeting, Stage::Greeting);
                        c.quit().await;
                        continue;
                    }
                    if !greeting.is_positive() {
                        last = Seen::reply(greeting, Stage::Greeting);
                        c.quit().await;
                        break 'hosts;
                    }
                    let via = Via {
                        mx: name.clone(),
                        ip: addr.ip().to_string(),
                        tls: None,
                        esmtp: false,
                    };
                    conn = Some((c, via));
                    break 'hosts;
                }
                Err(e) => {
                    crate::metrics::METRICS.connection(match e {
                        ClientError::Timeout(_) => "timeout",
                        _ => "failed",
                    });
                    let stage = match e {
                        ClientError::Timeout("the greeting") => Stage::Greeting,
                        _ => Stage::Connect,
                    };
                    let mut seen = Seen::failed(&e, stage);
                    seen.reply = Reply::local(451, "4.4.1", format!("{name} [{}]: {e}", addr.ip()));
                    last = seen;
                }
            }
        }
    }
    let Some((mut client, mut via)) = conn else {
        let outs = all(&pending, &last, &Via::default(), &s.source_ip);
        worker.report(lease_id, outs, true).await;
        return;
    };
    client.timeouts = timeouts(&s);
    if let Err(seen) = prepare(&mut client, &s, &mut via).await {
        let outs = all(&pending, &seen, &via, &s.source_ip);
        worker.report(lease_id, outs, true).await;
        client.quit().await;
        return;
    }
    let max_msgs = if s.max_msg_per_connection == 0 {
        u32::MAX
    } else {
        s.max_msg_per_connection
    };
    let max_errors = s.max_errors_per_connection.max(1);
    let mut sent = 0u32;
    let mut errors = 0u32;
    let mut first = true;
    let mut broken = false;
    let mut unreported: Vec<Outcome> = Vec::new();
    let mut skip_mx = false;
    let stop = |sent: u32, errors: u32, broken: bool, skip_mx: bool| {
        sent >= max_msgs || errors >= max_errors || broken || skip_mx || worker.lease_gone(lease_id)
    };
    'outer: loop {
        while !pending.is_empty() {
            if stop(sent, errors, broken, skip_mx) {
                break 'outer;
            }
            let msg = pending.remove(0);
            let t = transaction(&worker, &mut client, &s, &via, &msg, first, max_msgs - sent).await;
            first = false;
            sent = sent.saturating_add(t.count.max(1));
            if !t.ok {
                errors += 1;
            }
            broken = t.broken;
            if t.last.as_ref().is_some_and(|r| skips(&worker, r)) {
                worker.skip_host(&via.mx);
                skip_mx = true;
            }
            unreported.extend(t.outcomes);
            // Reports are grouped: fewer Raft entries, at the cost of redelivering a few more
            // messages if this worker dies (delivery is at least once anyway).
            if unreported.len() >= REPORT_EVERY
                && !worker
                    .report(lease_id, std::mem::take(&mut unreported), false)
                    .await
            {
                break 'outer;
            }
        }
        if stop(sent, errors, broken, skip_mx) {
            break;
        }
        if !unreported.is_empty()
            && !worker
                .report(lease_id, std::mem::take(&mut unreported), false)
                .await
        {
            break;
        }
        // Ask for more of this queue on the same connection.
        let want = (max_msgs - sent).min(worker.batch);
        match worker.more(lease_id, want).await {
            Some(more) if !more.is_empty() => pending = more,
            _ => break,
        }
    }
    // Anything not tried goes back to the queue when the lease ends.
    if !broken {
        client.quit().await;
    }
    worker.report(lease_id, unreported, true).await;
}

async fn resolve(
    worker: &Worker,
    s: &DeliverySettings,
) -> Result<Vec<(String, Vec<std::net::SocketAddr>)>, Seen> {
    if !s.hosts.is_empty() {
        let mut out = Vec::new();
        for h in &s.hosts {
            let (name, lit, port) = parse_fixed(h, worker.smtp_port);
            let addrs = match lit {
                Some(a) => vec![a],
                None => worker
                    .mx
                    .addresses(&name)
                    .await
                    .into_iter()
                    .map(|a| std::net::SocketAddr::new(a.ip(), port))
                    .collect(),
            };
            out.push((name, addrs));
        }
        return Ok(out);
    }
    let d = &s.mx_domain;
    let local = |code, enhanced, text: String| Err(Seen::local(code, enhanced, text, Stage::Local));
    match worker.mx.route(d).await {
        Route::Hosts(h) => Ok(h.into_iter().map(|h| (h.name, h.addrs)).collect()),
        Route::NullMx => local(
            556,
            "5.1.10",
            format!("{d} accepts no mail (null MX, RFC 7505)"),
        ),
        Route::NoDomain => local(550, "5.1.2", format!("the domain {d} does not exist")),
        Route::NoMx if s.bounce_upon_no_mx => {
            local(550, "5.1.2", format!("{d} has no MX or address record"))
        }
        Route::NoMx => local(451, "4.4.3", format!("{d} has no MX or address record")),
        Route::TempFail(e) => local(451, "4.4.3", format!("DNS lookup for {d} failed: {e}")),
    }
}

/// EHLO and STARTTLS. What goes wrong here applies to every message of the lease.
async fn prepare(client: &mut Client, s: &DeliverySettings, via: &mut Via) -> Result<(), Seen> {
    let r = client
        .hello(&s.ehlo_name)
        .await
        .map_err(|e| Seen::failed(&e, Stage::Ehlo))?;
    if !r.is_positive() {
        return Err(Seen::reply(r, Stage::Ehlo));
    }
    via.esmtp = client.esmtp;
    let want_tls = s.use_starttls || s.require_starttls;
    if want_tls && client.ext.starttls {
        let r = client
            .starttls(&via.mx, Duration::from_secs(30), s.require_starttls)
            .await
            .map_err(|e| match e {
                ClientError::Verify(why) => Seen::local(451, "4.7.5", why, Stage::Starttls),
                e => Seen::failed(&e, Stage::Starttls),
            })?;
        if r.code != 220 {
            if s.require_starttls {
                return Err(Seen::local(
                    451,
                    "4.7.5",
                    format!("TLS is required but STARTTLS was refused: {}", r.line()),
                    Stage::Starttls,
                ));
            }
        } else {
            crate::metrics::METRICS.tls_sessions.inc();
            via.tls = client.tls.clone();
            let r = client
                .hello(&s.ehlo_name)
                .await
                .map_err(|e| Seen::failed(&e, Stage::Ehlo))?;
            if !r.is_positive() {
                return Err(Seen::reply(r, Stage::Ehlo));
            }
        }
    } else if s.require_starttls {
        // Never send in clear to a destination that requires TLS.
        return Err(Seen::local(
            451,
            "4.7.5",
            format!(
                "TLS is required but {} does not offer STARTTLS; not sent in clear",
                via.mx
            ),
            Stage::Starttls,
        ));
    }
    Ok(())
}

/// One message's transaction: what every recipient saw, whether any was accepted, whether the
/// connection is unusable now, and the last reply (for `skip-mx`).
struct Transaction {
    outcomes: Vec<Outcome>,
    /// SMTP transactions made (more than one for a VERP message).
    count: u32,
    ok: bool,
    broken: bool,
    last: Option<Reply>,
}

/// The envelope's replies: MAIL, one per RCPT, and DATA (None where not sent).
struct EnvelopeReplies {
    mail: Reply,
    rcpts: Vec<Option<Reply>>,
    data: Option<Reply>,
}

/// MAIL, RCPTs and DATA, pipelined when offered (RFC 2920: the whole envelope in one write).
async fn envelope(
    client: &mut Client,
    mail: &Cmd,
    rcpts: &[Cmd],
    rset: bool,
) -> Result<EnvelopeReplies, ClientError> {
    if client.ext.pipelining {
        let mut cmds = String::new();
        if rset {
            cmds.push_str(&Cmd::Rset.line());
        }
        cmds.push_str(&mail.line());
        for r in rcpts {
            cmds.push_str(&r.line());
        }
        cmds.push_str(&Cmd::Data.line());
        let t = client.timeouts.command;
        client.send(cmds.as_bytes(), t).await?;
        if rset {
            client.read_reply(t, "the RSET reply").await?;
        }
        let mail = client.read_reply(t, "the MAIL reply").await?;
        let mut replies = Vec::with_capacity(rcpts.len());
        for _ in rcpts {
            replies.push(Some(client.read_reply(t, "a RCPT reply").await?));
        }
        let data = client.read_reply(t, "the DATA reply").await?;
        return Ok(EnvelopeReplies {
            mail,
            rcpts: replies,
            data: Some(data),
        });
    }
    if rset {
        client.command(&Cmd::Rset, "the RSET reply").await?;
    }
    let mail_reply = client.command(mail, "the MAIL reply").await?;
    let mut replies = vec![None; rcpts.len()];
    let mut data = None;
    if mail_reply.is_positive() {
        for (i, r) in rcpts.iter().enumerate() {
            replies[i] = Some(client.command(r, "a RCPT reply").await?);
        }
        if replies.iter().flatten().any(|r| r.is_positive()) {
            data = Some(client.command(&Cmd::Data, "the DATA reply").await?);
        }
    }
    Ok(EnvelopeReplies {
        mail: mail_reply,
        rcpts: replies,
        data,
    })
}

async fn transaction(
    worker: &Worker,
    client: &mut Client,
    s: &DeliverySettings,
    via: &Via,
    msg: &LeasedMessage,
    first: bool,
    budget: u32,
) -> Transaction {
    let body: &[u8] = &msg.body;
    let size = body.len() as u64;
    let mut t = Transaction {
        outcomes: Vec::new(),
        count: 0,
        ok: false,
        broken: false,
        last: None,
    };
    let all_saw = |t: &mut Transaction, seen: Seen| {
        t.outcomes
            .extend(all(std::slice::from_ref(msg), &seen, via, &s.source_ip));
        t.last = Some(seen.reply);
    };
    if let Some(max) = client.ext.size
        && size > max
    {
        let seen = Seen::local(
            552,
            "5.3.4",
            format!(
                "message size {size} exceeds the {max} octets {} accepts",
                via.mx
            ),
            Stage::Local,
        );
        all_saw(&mut t, seen);
        return t;
    }
    let needs_utf8 =
        !msg.mail_from.is_ascii() || msg.recipients.iter().any(|r| !r.address.is_ascii());
    if needs_utf8 && !client.ext.smtputf8 {
        let seen = Seen::local(
            553,
            "5.6.7",
            "the address needs SMTPUTF8, which the receiver does not offer",
            Stage::Local,
        );
        all_saw(&mut t, seen);
        return t;
    }
    // Signed once per message; the signature goes in front without copying the body.
    let signature = match worker.signer_for(s, body) {
        Ok(sig) => sig.unwrap_or_default(),
        Err(e) => {
            all_saw(&mut t, Seen::local(451, "4.7.0", e, Stage::Local));
            return t;
        }
    };
    let eightbit = !body.is_ascii();
    // VERP: each recipient its own transaction, from its own return path.
    let chunk = if msg.verp {
        1
    } else {
        s.max_rcpt_per_message.max(1) as usize
    };
    let data = dot_stuff(&[signature.as_bytes(), body]);
    let source = s.source_ip.as_str();
    // A receiver that offers DSN gets the sender's DSN requests and reports by itself.
    let dsn = client.ext.dsn;
    let out = |i: u32, seen: &Seen| Outcome {
        dsn,
        ..outcome(msg, i, seen, via, source)
    };
    for (ci, rcpts) in msg.recipients.chunks(chunk).enumerate() {
        // A connection's max-msg-per-connection counts each transaction; recipients not
        // tried here get no outcome and go back to the queue with the lease.
        if ci as u32 >= budget.max(1) {
            break;
        }
        t.count += 1;
        let mut params = Vec::new();
        if client.ext.size.is_some() {
            params.push(("SIZE".to_string(), Some(size.to_string())));
        }
        if eightbit && client.ext.eightbit && !s.ignore_8bitmime {
            params.push(("BODY".to_string(), Some("8BITMIME".to_string())));
        }
        if needs_utf8 {
            params.push(("SMTPUTF8".to_string(), None));
        }
        if dsn {
            if !msg.ret.is_empty() {
                params.push(("RET".to_string(), Some(msg.ret.clone())));
            }
            // Only a well-formed value goes on: a parameter never carries another.
            if !msg.envid.is_empty()
                && msg.envid.len() <= 100
                && sluice_common::dsn::is_xtext(&msg.envid)
            {
                params.push(("ENVID".to_string(), Some(msg.envid.clone())));
            }
        }
        let from = if msg.verp {
            sluice_common::returns::verp_encode(&msg.mail_from, &rcpts[0].address)
        } else {
            msg.mail_from.clone()
        };
        let mail = Cmd::Mail { from, params };
        let addrs: Vec<Cmd> = rcpts
            .iter()
            .map(|r| {
                let mut params = Vec::new();
                if dsn {
                    if let Some(n) = sluice_common::dsn::notify_param((r.notify & 15) as u8) {
                        params.push(("NOTIFY".to_string(), Some(n)));
                    }
                    if r.orcpt.contains(';') && sluice_common::dsn::is_xtext(&r.orcpt) {
                        params.push(("ORCPT".to_string(), Some(r.orcpt.clone())));
                    }
                }
                Cmd::Rcpt {
                    to: r.address.clone(),
                    params,
                }
            })
            .collect();
        let rset = !(first && ci == 0);
        let began = std::time::Instant::now();
        let env = match envelope(client, &mail, &addrs, rset).await {
            Ok(e) => e,
            Err(e) => {
                let seen = Seen::failed(&e, Stage::Mail);
                t.outcomes.extend(rcpts.iter().map(|r| out(r.index, &seen)));
                t.last = Some(seen.reply);
                t.broken = true;
                return t;
            }
        };
        if !env.mail.is_positive() {
            let seen = Seen::reply(env.mail, Stage::Mail);
            t.outcomes.extend(rcpts.iter().map(|r| out(r.index, &seen)));
            t.last = Some(seen.reply);
            continue;
        }
        let mut accepted = Vec::new();
        for (rc, rr) in rcpts.iter().zip(env.rcpts) {
            match rr {
                Some(r) if r.is_positive() => accepted.push(rc),
                Some(r) => {
                    t.outcomes
                        .push(out(rc.index, &Seen::reply(r.clone(), Stage::Rcpt)));
                    t.last = Some(r);
                }
                None => {}
            }
        }
        let data_reply = match env.data {
            Some(r) if r.code == 354 => r,
            other => {
                // Only a refusal that concerned accepted recipients is theirs to report.
                if !accepted.is_empty() {
                    let seen = match other {
                        Some(r) => Seen::reply(r, Stage::Data),
                        None => Seen::local(451, "4.5.0", "DATA was not sent", Stage::Data),
                    };
                    t.outcomes
                        .extend(accepted.iter().map(|rc| out(rc.index, &seen)));
                    t.last = Some(seen.reply);
                }
                continue;
            }
        };
        let _ = data_reply;
        if accepted.is_empty() {
            // The server took DATA although no recipient was accepted: end it without content.
            let _ = client.send_content(b".\r\n").await;
            let _ = client
                .read_reply(client.timeouts.data_termination, "the end-of-data reply")
                .await;
            continue;
        }
        if let Err(e) = client.send_content(&data).await {
            // Not sent whole: never counts as delivered.
            let seen = Seen::failed(&e, Stage::Content);
            t.outcomes
                .extend(accepted.iter().map(|rc| out(rc.index, &seen)));
            t.last = Some(seen.reply);
            t.broken = true;
            return t;
        }
        let seen = match client
            .read_reply(client.timeouts.data_termination, "the end-of-data reply")
            .await
        {
            Ok(r) => {
                crate::metrics::METRICS
                    .delivery_seconds
                    .observe(began.elapsed().as_secs_f64());
                Seen::reply(r, Stage::EndOfData)
            }
            Err(e) => {
                // Sent whole, no reply: the leader decides (assume-delivery-upon-data-
                // termination-timeout).
                t.broken = true;
                Seen::failed(&e, Stage::EndOfData)
            }
        };
        t.ok |= seen.reply.is_positive();
        t.outcomes
            .extend(accepted.iter().map(|rc| out(rc.index, &seen)));
        t.last = Some(seen.reply);
        if t.broken {
            return t;
        }
    }
    t
}
