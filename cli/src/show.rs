//! The `pmta`-style operator views and actions: `show topdomains|domains|vmtas|workers|jobs|
//! settings`, `set queue`, `disable|enable source`, `trace`, `inspect` and `explain`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use serde_json::json;
use sluice_proto::admin::admin_client::AdminClient;
use sluice_proto::admin::*;

use crate::{ControllerAddr, InspectArgs, SetCmd, ShowCmd, SourceCmd, TraceArgs};

use crate::admin::traffic_json;

fn traffic_cols(t: &Option<Traffic>) -> String {
    let t = t.unwrap_or_default();
    format!("{:>7} {:>7} {:>7}", t.delivered, t.deferred, t.bounced)
}

fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// A message id as printed at `250 ... queued as`: hex.
fn message_id(s: &str) -> anyhow::Result<u64> {
    u64::from_str_radix(s.trim().trim_start_matches("0x"), 16).with_context(|| {
        format!("`{s}` is not a message id (hex, as in `queued as 00000000000004d2`)")
    })
}

#[derive(Default)]
struct DomainRow {
    recipients: u64,
    queues: u32,
    connections: u32,
    oldest: u64,
    last_hour: Traffic,
}

fn domains(q: &QueuesReply) -> Vec<(String, DomainRow)> {
    let mut by: BTreeMap<String, DomainRow> = BTreeMap::new();
    for r in &q.queues {
        let d = by.entry(r.queue.clone()).or_default();
        d.recipients += r.recipients;
        d.queues += 1;
        d.connections += r.connections;
        d.oldest = d.oldest.max(r.oldest_age_s);
        if let Some(t) = &r.last_hour {
            d.last_hour.delivered += t.delivered;
            d.last_hour.deferred += t.deferred;
            d.last_hour.bounced += t.bounced;
        }
    }
    let mut v: Vec<_> = by.into_iter().collect();
    v.sort_by(|a, b| b.1.recipients.cmp(&a.1.recipients).then(a.0.cmp(&b.0)));
    v
}

fn print_domains(rows: &[(String, DomainRow)], json: bool) {
    if json {
        let v: Vec<_> = rows
            .iter()
            .map(|(d, r)| {
                json!({"domain": d, "recipients": r.recipients, "queues": r.queues,
                    "connections": r.connections, "oldest_age_s": r.oldest,
                    "last_hour": traffic_json(&Some(r.last_hour))})
            })
            .collect();
        return print_json(&json!(v));
    }
    println!(
        "{:<32} {:>7} {:>6} {:>5} {:>8}  {:>7} {:>7} {:>7}",
        "DOMAIN", "RCPTS", "QUEUES", "CONN", "OLDEST", "DLVR/H", "DEFR/H", "BNCE/H"
    );
    for (d, r) in rows {
        println!(
            "{:<32} {:>7} {:>6} {:>5} {:>7}s  {}",
            d,
            r.recipients,
            r.queues,
            r.connections,
            r.oldest,
            traffic_cols(&Some(r.last_hour))
        );
    }
}

pub async fn view(s: ShowCmd) -> anyhow::Result<()> {
    match s {
        ShowCmd::Status { .. } | ShowCmd::Queues { .. } => unreachable!("shown by admin"),
        ShowCmd::Topdomains { at, json, count } => {
            let q = on_leader!(at.controller, |c| c.queues(Empty {}));
            let mut rows = domains(&q);
            rows.truncate(count);
            print_domains(&rows, json);
        }
        ShowCmd::Domains { at, json } => {
            let q = on_leader!(at.controller, |c| c.queues(Empty {}));
            let mut rows = domains(&q);
            rows.sort_by(|a, b| a.0.cmp(&b.0));
            print_domains(&rows, json);
        }
        ShowCmd::Vmtas { at, json } => {
            let r = on_leader!(at.controller, |c| c.vmtas(Empty {}));
            if json {
                let v: Vec<_> = r
                    .vmtas
                    .iter()
                    .map(|v| {
                        json!({"name": v.name, "source_ip": v.source_ip, "host_name": v.host_name,
                            "pools": v.pools, "state": v.state, "disabled_for_s": v.disabled_for_s,
                            "recipients": v.recipients, "connections": v.connections,
                            "last_hour": traffic_json(&v.last_hour)})
                    })
                    .collect();
                print_json(&json!(v));
                return Ok(());
            }
            println!(
                "{:<20} {:<16} {:<10} {:>7} {:>5}  {:>7} {:>7} {:>7}  POOLS",
                "VMTA", "SOURCE IP", "STATE", "RCPTS", "CONN", "DLVR/H", "DEFR/H", "BNCE/H"
            );
            for v in &r.vmtas {
                println!(
                    "{:<20} {:<16} {:<10} {:>7} {:>5}  {}  {}",
                    v.name,
                    v.source_ip,
                    v.state,
                    v.recipients,
                    v.connections,
                    traffic_cols(&v.last_hour),
                    v.pools.join(",")
                );
            }
        }
        ShowCmd::Workers { at, json } => {
            let r = on_leader!(at.controller, |c| c.workers(Empty {}));
            if json {
                let v: Vec<_> = r
                    .workers
                    .iter()
                    .map(|w| {
                        json!({"name": w.name, "source_ips": w.source_ips, "live": w.live,
                            "last_seen_ms_ago": w.last_seen_ms_ago, "capacity": w.capacity,
                            "leases": w.leases, "policy_version": format!("{:016x}", w.policy_version)})
                    })
                    .collect();
                print_json(&json!(v));
                return Ok(());
            }
            println!(
                "{:<20} {:<6} {:>9} {:>8} {:>6}  {:<16}  SOURCE IPS",
                "WORKER", "LIVE", "SEEN", "CAPACITY", "LEASES", "POLICY"
            );
            for w in &r.workers {
                println!(
                    "{:<20} {:<6} {:>8}s {:>8} {:>6}  {:016x}  {}",
                    w.name,
                    if w.live { "yes" } else { "no" },
                    w.last_seen_ms_ago / 1000,
                    w.capacity,
                    w.leases,
                    w.policy_version,
                    w.source_ips.join(",")
                );
            }
        }
        ShowCmd::Jobs { at, json } => {
            let r = on_leader!(at.controller, |c| c.jobs(Empty {}));
            if json {
                let v: Vec<_> = r
                    .jobs
                    .iter()
                    .map(|j| {
                        json!({"job_id": j.job_id, "messages": j.messages,
                            "queued_recipients": j.queued_recipients,
                            "last_hour": traffic_json(&j.last_hour)})
                    })
                    .collect();
                print_json(&json!(v));
                return Ok(());
            }
            println!(
                "{:<32} {:>8} {:>7}  {:>7} {:>7} {:>7}",
                "JOB", "MESSAGES", "RCPTS", "DLVR/H", "DEFR/H", "BNCE/H"
            );
            for j in &r.jobs {
                let name = if j.job_id.is_empty() {
                    "(none)"
                } else {
                    &j.job_id
                };
                println!(
                    "{:<32} {:>8} {:>7}  {}",
                    name,
                    j.messages,
                    j.queued_recipients,
                    traffic_cols(&j.last_hour)
                );
            }
        }
        ShowCmd::Settings {
            domain,
            vmta,
            at,
            json,
        } => {
            let req = SettingsRequest {
                domain,
                vmta: vmta.unwrap_or_default(),
            };
            let r = &req;
            let s = on_leader!(at.controller, |c| c.settings(r.clone()));
            if json {
                let d: Vec<_> = s
                    .directives
                    .iter()
                    .map(|d| json!({"name": d.name, "value": d.value, "source": d.source}))
                    .collect();
                print_json(&json!({"rules": s.rules, "directives": d}));
                return Ok(());
            }
            for r in &s.rules {
                println!("# {r}");
            }
            print_directives(&s.directives);
        }
    }
    Ok(())
}

fn print_directives(d: &[Directive]) {
    let w = d.iter().map(|d| d.name.len()).max().unwrap_or(0);
    let v = d.iter().map(|d| d.value.len()).max().unwrap_or(0).min(40);
    for d in d {
        println!("{:<w$}  {:<v$}  {}", d.name, d.value, d.source);
    }
}

fn for_secs(f: &Option<String>) -> anyhow::Result<u64> {
    match f {
        None => Ok(0),
        Some(s) => {
            let d = sluice_common::policy::value::parse_duration(s).map_err(anyhow::Error::msg)?;
            if d.as_secs() == 0 {
                bail!("--for {s}: say how long, such as 30m or 2h");
            }
            if d.as_secs() > 366 * 86_400 {
                bail!("--for {s}: at most 366 days");
            }
            Ok(d.as_secs())
        }
    }
}

pub async fn set(s: SetCmd) -> anyhow::Result<()> {
    let SetCmd::Queue {
        pattern,
        mode,
        for_,
        at,
    } = s;
    let req = SetModeRequest {
        pattern: pattern.clone(),
        mode: mode.clone(),
        for_secs: for_secs(&for_)?,
    };
    let r = &req;
    let n = on_leader!(at.controller, |c| c.set_queue_mode(r.clone()));
    println!("{} queue(s) matching {pattern} now in {mode} mode", n.count);
    Ok(())
}

pub async fn source(s: SourceCmd, enable: bool) -> anyhow::Result<()> {
    let SourceCmd::Source { ip, for_, at } = s;
    if enable && for_.is_some() {
        bail!("--for goes with `disable source`");
    }
    let req = SourceRequest {
        ip: ip.clone(),
        enable,
        for_secs: for_secs(&for_)?,
    };
    let r = &req;
    on_leader!(at.controller, |c| c.set_source(r.clone()));
    match (enable, &for_) {
        (true, _) => println!("source {ip} enabled"),
        (false, Some(f)) => println!("source {ip} disabled for {f}"),
        (false, None) => println!("source {ip} disabled until `sluice enable source {ip}`"),
    }
    Ok(())
}

fn time_text(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(ms as i64)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S%.3f").to_string())
        .unwrap_or_default()
}

pub async fn trace(t: TraceArgs) -> anyhow::Result<()> {
    let message_id = match &t.message {
        Some(m) => message_id(m)?,
        None => 0,
    };
    if message_id == 0 && t.rcpt.is_none() {
        bail!("say what to trace: a message id, --rcpt ADDRESS, or both");
    }
    let req = MessageRequest {
        message_id,
        recipient: t.rcpt.clone().unwrap_or_default(),
    };
    let r = &req;
    let reply = on_leader!(t.at.controller, |c| c.trace(r.clone()));
    if t.json {
        let v: Vec<_> = reply
            .events
            .iter()
            .map(|e| {
                json!({"time_ms": e.time_ms, "message": format!("{:016x}", e.message_id),
                    "recipient": e.recipient, "kind": e.kind, "detail": e.detail})
            })
            .collect();
        print_json(&json!({"events": v, "truncated": reply.truncated}));
        return Ok(());
    }
    if reply.events.is_empty() {
        println!("nothing recorded for that message or recipient");
    }
    if reply.truncated {
        println!("(older accounting rows were not read: a trace reads at most 2,000,000)");
    }
    for e in &reply.events {
        println!(
            "{}  {:016x}  {:<4} {:<28} {}",
            time_text(e.time_ms),
            e.message_id,
            e.kind,
            e.recipient,
            e.detail
        );
    }
    Ok(())
}

pub async fn inspect(i: InspectArgs) -> anyhow::Result<()> {
    let req = MessageRequest {
        message_id: message_id(&i.message)?,
        recipient: String::new(),
    };
    let r = &req;
    let m = on_leader!(i.at.controller, |c| c.inspect(r.clone()));
    if i.json {
        let rcpts: Vec<_> = m
            .recipients
            .iter()
            .map(|r| {
                json!({"address": r.address, "orcpt": r.orcpt, "state": r.state,
                    "attempts": r.attempts, "next_attempt_in_s": r.next_attempt_in_s,
                    "last_error": r.last_error, "queue": r.queue, "lease": r.lease})
            })
            .collect();
        print_json(
            &json!({"id": format!("{:016x}", m.id), "mail_from": m.mail_from,
            "envid": m.envid, "ret": m.ret, "job_id": m.job_id, "received_by": m.received_by,
            "client_ip": m.client_ip, "received_ms": m.received_ms, "size": m.size,
            "priority": m.priority, "recipients": rcpts, "headers": m.headers}),
        );
        return Ok(());
    }
    println!("message     {:016x}", m.id);
    println!("from        <{}>", m.mail_from);
    println!(
        "received    {} by {} from {}",
        time_text(m.received_ms),
        m.received_by,
        m.client_ip
    );
    println!("size        {} bytes, priority {}", m.size, m.priority);
    if !m.job_id.is_empty() {
        println!("job         {}", m.job_id);
    }
    if !m.envid.is_empty() || !m.ret.is_empty() {
        println!("dsn         envid={} ret={}", m.envid, m.ret);
    }
    println!("recipients");
    for r in &m.recipients {
        let next = if r.state == "queued" {
            format!(", next attempt in {} s", r.next_attempt_in_s)
        } else {
            String::new()
        };
        println!(
            "  {:<32} {:<9} {} attempt(s){next}  {}  {}",
            r.address, r.state, r.attempts, r.queue, r.last_error
        );
    }
    println!("headers");
    for l in m.headers.lines() {
        println!("  {l}");
    }
    Ok(())
}

#[derive(Args)]
pub struct ExplainArgs {
    /// The recipient address.
    pub rcpt: String,
    /// The envelope sender.
    #[arg(long, default_value = "")]
    pub from: String,
    /// The injecting client's IP address (which `<source>` applies).
    #[arg(long)]
    pub source: Option<String>,
    /// The VMTA or pool asked for outside the headers (as HTTP injection's `vmta`).
    #[arg(long)]
    pub vmta: Option<String>,
    /// A header of the message, `Name: value` (repeatable), such as `X-Virtual-MTA: v1`.
    #[arg(long = "header")]
    pub headers: Vec<String>,
    /// Explain with this policy file instead of asking the cluster.
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// Look the MX records up with these DNS servers (IP:PORT, as a worker's `dns_servers`),
    /// and show the hosts in the order a worker tries them.
    #[arg(long, value_delimiter = ',')]
    pub dns: Vec<std::net::SocketAddr>,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub at: ControllerAddr,
}

pub async fn explain(e: ExplainArgs) -> anyhow::Result<()> {
    let req = ExplainRequest {
        rcpt: e.rcpt.clone(),
        mail_from: e.from.clone(),
        source_ip: e.source.clone().unwrap_or_default(),
        vmta: e.vmta.clone().unwrap_or_default(),
        headers: e.headers.clone(),
    };
    let reply = match &e.policy {
        Some(file) => explain_offline(file, &req)?,
        None => {
            let r = &req;
            on_leader!(e.at.controller, |c| c.explain(r.clone()))
        }
    };
    let mx = if e.dns.is_empty() || reply.mx_domain.is_empty() {
        None
    } else {
        let r = sluice_worker::mx::MxResolver::new(&e.dns, 25).map_err(anyhow::Error::msg)?;
        Some(r.route(&reply.mx_domain).await)
    };
    let mx_json = mx.as_ref().map(|r| match r {
        sluice_worker::mx::Route::Hosts(h) => json!(h
            .iter()
            .map(|h| json!({"host": h.name, "addresses": h.addrs.iter().map(|a| a.ip().to_string()).collect::<Vec<_>>()}))
            .collect::<Vec<_>>()),
        other => json!(format!("{other:?}")),
    });
    if e.json {
        let steps: Vec<_> = reply
            .steps
            .iter()
            .map(|s| json!({"question": s.question, "answer": s.answer, "source": s.source}))
            .collect();
        let settings: Vec<_> = reply
            .settings
            .iter()
            .map(|d| json!({"name": d.name, "value": d.value, "source": d.source}))
            .collect();
        print_json(&json!({"steps": steps, "settings": settings,
            "mx_domain": reply.mx_domain, "mx": mx_json}));
        return Ok(());
    }
    for s in &reply.steps {
        let at = if s.source.is_empty() {
            String::new()
        } else {
            format!("  [{}]", s.source)
        };
        println!("{:<14} {}{at}", format!("{}:", s.question), s.answer);
    }
    match &mx {
        Some(sluice_worker::mx::Route::Hosts(hosts)) => {
            for (i, h) in hosts.iter().enumerate() {
                let addrs: Vec<String> = h.addrs.iter().map(|a| a.ip().to_string()).collect();
                println!(
                    "{:<14} {} ({})",
                    if i == 0 { "MX:" } else { "" },
                    h.name,
                    addrs.join(", ")
                );
            }
        }
        Some(other) => println!("{:<14} {} : {other:?}", "MX:", reply.mx_domain),
        None if !reply.mx_domain.is_empty() => {
            println!(
                "{:<14} of {} (add --dns IP:PORT to look them up)",
                "MX:", reply.mx_domain
            )
        }
        None => {}
    }
    println!("\neffective settings:");
    print_directives(&reply.settings);
    Ok(())
}

/// `explain --policy FILE`: the same answer from a file, without a cluster.
fn explain_offline(file: &std::path::Path, r: &ExplainRequest) -> anyhow::Result<ExplainReply> {
    use sluice_common::policy::{self, LoadOptions};
    let loaded = policy::load(file, LoadOptions { read_files: false })
        .map_err(|e| anyhow::anyhow!("the policy does not load:\n{e}"))?;
    sluice_controller::views::explain(&loaded.policy, r).map_err(anyhow::Error::msg)
}
