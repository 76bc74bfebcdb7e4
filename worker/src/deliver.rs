//! Delivering one lease: route, connect (trying the next MX on failure), then one
//! transaction per message (recipients grouped up to max-rcpt-per-message), reusing the
//! connection until max-msg-per-connection, and reporting every recipient's outcome.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use sluice_proto::lease::outcome::Kind;
use sluice_proto::lease::{DeliverySettings, Lease, LeasedMessage, Outcome};

use crate::Worker;
use crate::mx::{Route, parse_fixed};
use crate::smtp_client::{Client, ClientError, Reply, dot_stuff};

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

/// Marks a reply to DATA or to the end of data (the classifier reads it).
fn after_data(mut o: Outcome) -> Outcome {
    o.after_data = true;
    o
}

fn outcome(
    msg: &LeasedMessage,
    index: u32,
    reply: &Reply,
    via: &Via,
    source: &str,
    size: u64,
    action: &str,
) -> Outcome {
    let kind = if reply.code < 400 {
        Kind::Delivered
    } else if reply.is_permanent() {
        Kind::Bounced
    } else {
        Kind::Transient
    };
    Outcome {
        message_id: msg.id.clone(),
        rcpt_index: index,
        kind: kind as i32,
        code: reply.code as u32,
        enhanced: reply.enhanced.clone(),
        text: reply.text.clone(),
        mx_host: via.mx.clone(),
        mx_ip: via.ip.clone(),
        tls: via.tls.is_some(),
        tls_version: via.tls.as_ref().map(|t| t.0.clone()).unwrap_or_default(),
        tls_cipher: via.tls.as_ref().map(|t| t.1.clone()).unwrap_or_default(),
        source_ip: source.to_string(),
        esmtp: via.esmtp,
        size,
        pattern_action: action.to_string(),
        after_data: false,
    }
}

/// Every recipient of the messages gets the same reply (no connection, TLS refused, ...).
fn all(
    msgs: &[LeasedMessage],
    reply: &Reply,
    via: &Via,
    source: &str,
    action: &str,
) -> Vec<Outcome> {
    msgs.iter()
        .flat_map(|m| {
            m.recipients
                .iter()
                .map(move |r| outcome(m, r.index, reply, via, source, m.body.len() as u64, action))
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
    let action_for = |w: &Worker, r: &Reply| w.pattern_action(&s.smtp_pattern_list, &r.line());

    // Route; hosts taken out of use by skip-mx are passed over while another remains.
    let hosts = match resolve(&worker, &s).await {
        Ok(h) if h.iter().any(|(n, _)| !worker.is_skipped(n)) => h
            .into_iter()
            .filter(|(n, _)| !worker.is_skipped(n))
            .collect(),
        Ok(h) => h,
        Err(reply) => {
            let via = Via::default();
            let act = action_for(&worker, &reply);
            worker
                .report(
                    lease_id,
                    all(&pending, &reply, &via, &s.source_ip, &act),
                    true,
                )
                .await;
            return;
        }
    };
    // Connect: next host on failure, up to mx-connection-attempts.
    let attempts = s.mx_connection_attempts.max(1) as usize;
    let mut last_err = Reply::local(451, "4.4.1", "no host to connect to");
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
                    if greeting.code == 421 && s.smtp_421_means_mx_unavailable {
                        last_err = greeting;
                        c.quit().await;
                        continue;
                    }
                    if !greeting.is_positive() {
                        last_err = greeting;
                        c.quit().await;
                        break 'hosts;
                    }
                    conn = Some((
                        c,
                        Via {
                            mx: name.clone(),
                            ip: addr.ip().to_string(),
                            tls: None,
                            esmtp: false,
                        },
                    ));
                    break 'hosts;
                }
                Err(e) => {
                    last_err = Reply::local(451, "4.4.1", format!("{name} [{}]: {e}", addr.ip()))
                }
            }
        }
    }
    let Some((mut client, mut via)) = conn else {
        // A greeting 5xx does not bounce by default: retry later.
        let reply = if last_err.code >= 500 {
            Reply::local(451, "4.4.1", last_err.line())
        } else {
            last_err
        };
        let act = action_for(&worker, &reply);
        worker
            .report(
                lease_id,
                all(&pending, &reply, &Via::default(), &s.source_ip, &act),
                true,
            )
            .await;
        return;
    };
    client.data_timeout = Duration::from_millis(s.data_timeout_ms);
    match prepare(&mut client, &s, &mut via).await {
        Ok(()) => {}
        Err(reply) => {
            let act = action_for(&worker, &reply);
            worker
                .report(
                    lease_id,
                    all(&pending, &reply, &via, &s.source_ip, &act),
                    true,
                )
                .await;
            client.quit().await;
            return;
        }
    }
    let max_msgs = if s.max_msg_per_connection == 0 {
        u32::MAX
    } else {
        s.max_msg_per_connection
    };
    let mut sent = 0u32;
    let mut errors = 0u32;
    let mut first = true;
    let mut broken = false;
    let mut unreported: Vec<Outcome> = Vec::new();
    let mut skip_mx = false;
    'outer: loop {
        while let Some(msg) = pending.first().cloned() {
            if sent >= max_msgs || errors >= s.max_errors_per_connection.max(1) || broken || skip_mx
            {
                break 'outer;
            }
            pending.remove(0);
            let (outs, ok, fatal) = transaction(&worker, &mut client, &s, &via, &msg, first).await;
            first = false;
            sent += 1;
            if !ok {
                errors += 1;
            }
            broken = fatal;
            // Reports are grouped: fewer Raft entries, at the cost of redelivering a few more
            // messages if this worker dies (delivery is at least once anyway).
            if outs
                .iter()
                .any(|o| o.pattern_action.split(',').any(|a| a == "skip-mx"))
            {
                worker.skip_host(&via.mx);
                skip_mx = true;
            }
            unreported.extend(outs);
            if unreported.len() >= REPORT_EVERY {
                worker
                    .report(lease_id, std::mem::take(&mut unreported), false)
                    .await;
            }
        }
        if sent >= max_msgs || broken || skip_mx || errors >= s.max_errors_per_connection.max(1) {
            break;
        }
        if !unreported.is_empty() {
            worker
                .report(lease_id, std::mem::take(&mut unreported), false)
                .await;
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
) -> Result<Vec<(String, Vec<std::net::SocketAddr>)>, Reply> {
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
    match worker.mx.route(&s.mx_domain).await {
        Route::Hosts(h) => Ok(h.into_iter().map(|h| (h.name, h.addrs)).collect()),
        Route::NullMx => Err(Reply::local(
            556,
            "5.1.10",
            format!("{} accepts no mail (null MX, RFC 7505)", s.mx_domain),
        )),
        Route::NoDomain => Err(Reply::local(
            550,
            "5.1.2",
            format!("the domain {} does not exist", s.mx_domain),
        )),
        Route::NoMx if s.bounce_upon_no_mx => Err(Reply::local(
            550,
            "5.1.2",
            format!("{} has no MX or address record", s.mx_domain),
        )),
        Route::NoMx => Err(Reply::local(
            451,
            "4.4.3",
            format!("{} has no MX or address record", s.mx_domain),
        )),
        Route::TempFail(e) => Err(Reply::local(
            451,
            "4.4.3",
            format!("DNS lookup for {} failed: {e}", s.mx_domain),
        )),
    }
}

/// EHLO and STARTTLS. An error reply applies to every message of the lease.
async fn prepare(client: &mut Client, s: &DeliverySettings, via: &mut Via) -> Result<(), Reply> {
    let io = |e: ClientError| Reply::local(451, "4.4.2", e.to_string());
    let r = client.hello(&s.ehlo_name).await.map_err(io)?;
    if !r.is_positive() {
        return Err(if r.is_permanent() {
            Reply::local(451, "4.4.2", format!("EHLO refused: {}", r.line()))
        } else {
            r
        });
    }
    via.esmtp = client.esmtp;
    let want_tls = s.use_starttls || s.require_starttls;
    if want_tls && client.ext.starttls {
        let r = client
            .starttls(&via.mx, Duration::from_secs(30))
            .await
            .map_err(io)?;
        if r.code != 220 {
            if s.require_starttls {
                return Err(Reply::local(
                    451,
                    "4.7.5",
                    format!("TLS is required but STARTTLS was refused: {}", r.line()),
                ));
            }
        } else {
            via.tls = client.tls.clone();
            let r = client.hello(&s.ehlo_name).await.map_err(io)?;
            if !r.is_positive() {
                return Err(Reply::local(
                    451,
                    "4.4.2",
                    format!("EHLO after STARTTLS refused: {}", r.line()),
                ));
            }
        }
    } else if s.require_starttls {
        // Never send in clear to a destination that requires TLS.
        return Err(Reply::local(
            451,
            "4.7.5",
            format!(
                "TLS is required but {} does not offer STARTTLS; not sent in clear",
                via.mx
            ),
        ));
    }
    Ok(())
}

/// One message: MAIL, RCPTs and DATA (pipelined when offered). Returns the outcomes, whether
/// the transaction succeeded, and whether the connection is unusable.
async fn transaction(
    worker: &Worker,
    client: &mut Client,
    s: &DeliverySettings,
    via: &Via,
    msg: &LeasedMessage,
    first: bool,
) -> (Vec<Outcome>, bool, bool) {
    let body: &[u8] = &msg.body;
    let size = body.len() as u64;
    let act = |r: &Reply| worker.pattern_action(&s.smtp_pattern_list, &r.line());
    // One recipient's outcome for a reply of this transaction.
    let outcome_for =
        |index: u32, r: &Reply| outcome(msg, index, r, via, &s.source_ip, size, &act(r));
    if let Some(max) = client.ext.size
        && size > max
    {
        let r = Reply::local(
            552,
            "5.3.4",
            format!(
                "message size {size} exceeds the {max} octets {} accepts",
                via.mx
            ),
        );
        return (
            all(std::slice::from_ref(msg), &r, via, &s.source_ip, &act(&r)),
            false,
            false,
        );
    }
    let needs_utf8 =
        !msg.mail_from.is_ascii() || msg.recipients.iter().any(|r| !r.address.is_ascii());
    if needs_utf8 && !client.ext.smtputf8 {
        let r = Reply::local(
            553,
            "5.6.7",
            "the address needs SMTPUTF8, which the receiver does not offer",
        );
        return (
            all(std::slice::from_ref(msg), &r, via, &s.source_ip, &act(&r)),
            false,
            false,
        );
    }
    // Signed once per message; the signature goes in front without copying the body.
    let signature = match worker.signer_for(s, body) {
        Ok(sig) => sig.unwrap_or_default(),
        Err(e) => {
            let r = Reply::local(451, "4.7.0", e);
            return (
                all(std::slice::from_ref(msg), &r, via, &s.source_ip, ""),
                false,
                false,
            );
        }
    };
    let eightbit = body.iter().any(|&b| b >= 0x80);
    let mut outs = Vec::new();
    let chunk = s.max_rcpt_per_message.max(1) as usize;
    let data = dot_stuff(&[signature.as_bytes(), body]);
    let mut any_ok = false;
    for (ci, rcpts) in msg.recipients.chunks(chunk).enumerate() {
        let mut mail = format!("MAIL FROM:<{}>", msg.mail_from);
        if client.ext.size.is_some() {
            mail.push_str(&format!(" SIZE={size}"));
        }
        if eightbit && client.ext.eightbit && !s.ignore_8bitmime {
            mail.push_str(" BODY=8BITMIME");
        }
        if needs_utf8 {
            mail.push_str(" SMTPUTF8");
        }
        let mut cmds = String::new();
        if !(first && ci == 0) {
            cmds.push_str("RSET\r\n");
        }
        cmds.push_str(&mail);
        cmds.push_str("\r\n");
        let io = |e: ClientError| Reply::local(451, "4.4.2", e.to_string());
        let pipelined = client.ext.pipelining;
        // With PIPELINING the whole envelope goes in one write (RFC 2920).
        let mut replies: Vec<Reply> = Vec::new();
        let expect_rset = !(first && ci == 0);
        let result: Result<(), Reply> = async {
            if pipelined {
                for r in rcpts {
                    cmds.push_str(&format!("RCPT TO:<{}>\r\n", r.address));
                }
                cmds.push_str("DATA\r\n");
                client
                    .send(cmds.as_bytes(), client.command_timeout)
                    .await
                    .map_err(io)?;
                let n = rcpts.len() + 2 + usize::from(expect_rset);
                for _ in 0..n {
                    replies.push(
                        client
                            .read_reply(client.command_timeout, "an envelope reply")
                            .await
                            .map_err(io)?,
                    );
                }
            } else {
                if expect_rset {
                    replies.push(client.command("RSET", "the RSET reply").await.map_err(io)?);
                }
                let r = client.command(&mail, "the MAIL reply").await.map_err(io)?;
                let ok = r.is_positive();
                replies.push(r);
                for rc in rcpts {
                    if ok {
                        replies.push(
                            client
                                .command(&format!("RCPT TO:<{}>", rc.address), "the RCPT reply")
                                .await
                                .map_err(io)?,
                        );
                    } else {
                        replies.push(Reply::local(0, "", ""));
                    }
                }
                let any = ok
                    && replies[replies.len() - rcpts.len()..]
                        .iter()
                        .any(|r| r.is_positive());
                if any {
                    replies.push(client.command("DATA", "the DATA reply").await.map_err(io)?);
                } else {
                    replies.push(Reply::local(0, "", ""));
                }
            }
            Ok(())
        }
        .await;
        if let Err(r) = result {
            for rc in rcpts {
                outs.push(outcome_for(rc.index, &r));
            }
            return (outs, false, true);
        }
        if expect_rset {
            replies.remove(0);
        }
        let mail_reply = replies[0].clone();
        let rcpt_replies = &replies[1..1 + rcpts.len()];
        let data_reply = replies[1 + rcpts.len()].clone();
        if !mail_reply.is_positive() {
            for rc in rcpts {
                outs.push(outcome_for(rc.index, &mail_reply));
            }
            continue;
        }
        let mut accepted = Vec::new();
        for (rc, rr) in rcpts.iter().zip(rcpt_replies) {
            if rr.is_positive() {
                accepted.push(rc);
            } else {
                outs.push(outcome_for(rc.index, rr));
            }
        }
        if data_reply.code != 354 {
            for rc in &accepted {
                let r = if data_reply.code == 0 {
                    Reply::local(451, "4.5.0", "DATA was not accepted")
                } else {
                    data_reply.clone()
                };
                outs.push(after_data(outcome_for(rc.index, &r)));
            }
            continue;
        }
        if accepted.is_empty() {
            // The server took DATA although no recipient was accepted: end it without content.
            let _ = client.send(b".\r\n", client.data_timeout).await;
            let _ = client
                .read_reply(client.data_timeout, "the end-of-data reply")
                .await;
            continue;
        }
        let final_reply = match client.send(&data, client.data_timeout).await {
            Ok(()) => {
                client
                    .read_reply(client.data_timeout, "the end-of-data reply")
                    .await
            }
            Err(e) => Err(e),
        };
        let final_reply = match final_reply {
            Ok(r) => r,
            Err(ClientError::Timeout(_)) if s.assume_delivery_upon_data_termination_timeout => {
                Reply::local(
                    250,
                    "2.0.0",
                    "assumed delivered: timeout after the end of data",
                )
            }
            Err(e) => {
                let r = Reply::local(451, "4.4.2", e.to_string());
                for rc in &accepted {
                    outs.push(outcome_for(rc.index, &r));
                }
                return (outs, false, true);
            }
        };
        any_ok |= final_reply.is_positive();
        for rc in &accepted {
            outs.push(after_data(outcome_for(rc.index, &final_reply)));
        }
    }
    (outs, any_ok, false)
}
