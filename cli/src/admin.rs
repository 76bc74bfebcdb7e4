//! Operator commands: gRPC calls to a controller, following the leader when a follower names it.

use std::collections::HashMap;

use anyhow::{Context, bail};
use sluice_proto::admin::admin_client::AdminClient;
use sluice_proto::admin::*;
use tonic::transport::Channel;

use crate::{ClusterCmd, ControllerAddr, DebugCmd, DeleteArgs, QueueArg, ShowCmd};

/// Calls the leader, starting at the controller at `addr` and following it to the leader,
/// within 30 s (or the seconds given). Values the call uses from outside are borrowed (bind
/// `let x = &x;` first).
macro_rules! on_leader {
    ($addr:expr, |$c:ident| $body:expr) => {
        on_leader!($addr, 30, |$c| $body)
    };
    ($addr:expr, $secs:expr, |$c:ident| $body:expr) => {{
        let client = sluice_proto::LeaderClient::new(vec![$addr.to_string()]);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs($secs);
        client
            .call(deadline, |ch| {
                let mut $c = AdminClient::new(ch);
                async move { $body.await }
            })
            .await
            .map_err(|st| anyhow::anyhow!("{}", st.message()))?
    }};
}

pub async fn cluster(c: ClusterCmd) -> anyhow::Result<()> {
    match c {
        ClusterCmd::Init { at, members } => {
            let mut map = HashMap::new();
            for m in members {
                let (id, addr) = m
                    .split_once('=')
                    .with_context(|| format!("`{m}` is not ID=ADDR"))?;
                map.insert(
                    id.parse::<u64>()
                        .with_context(|| format!("`{id}` is not a node id"))?,
                    addr.to_string(),
                );
            }
            let ch = sluice_proto::connect(&at.controller)
                .await
                .with_context(|| format!("cannot reach {}", at.controller))?;
            AdminClient::new(ch)
                .init(InitRequest { members: map })
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
            println!("cluster initialised");
        }
        ClusterCmd::Add { node_id, addr, at } => {
            let a = &addr;
            // The new node must catch up before it votes: that can take minutes.
            on_leader!(at.controller, 3600, |c| c.add_node(AddNodeRequest {
                node_id,
                addr: a.clone()
            }));
            println!("node {node_id} ({addr}) added and promoted to voter");
        }
        ClusterCmd::Remove { node_id, at } => {
            on_leader!(at.controller, |c| c
                .remove_node(RemoveNodeRequest { node_id }));
            println!("node {node_id} removed");
        }
        ClusterCmd::Status {
            at,
            ready: true,
            max_lag,
            ..
        } => {
            let why = not_ready(&at.controller, max_lag).await;
            match why {
                None => println!("ready"),
                Some(why) => bail!("not ready: {why}"),
            }
        }
        ClusterCmd::Status { at, json, .. } => {
            let s = on_leader!(at.controller, |c| status_from_leader(&mut c));
            let views = node_views(&s).await;
            print_status(&s, &views, json);
        }
    }
    Ok(())
}

/// Why the controller at `addr` is not ready to serve, if it is not: it must know a leader and
/// have applied the log to within `max_lag` entries of what the leader has committed.
async fn not_ready(addr: &str, max_lag: u64) -> Option<String> {
    let ask = |a: String| async move {
        let ch = sluice_proto::connect(&a)
            .await
            .map_err(|e| format!("cannot reach {a}: {e}"))?;
        AdminClient::new(ch)
            .status(Empty {})
            .await
            .map(|r| r.into_inner())
            .map_err(|e| format!("{a}: {}", e.message()))
    };
    let limit = std::time::Duration::from_secs(3);
    let me = match tokio::time::timeout(limit, ask(addr.to_string())).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Some(e),
        Err(_) => return Some(format!("{addr} did not answer")),
    };
    if me.leader_id == 0 {
        return Some(format!("node {} knows no leader", me.node_id));
    }
    let leader_committed = if me.leader_id == me.node_id {
        me.committed
    } else {
        match tokio::time::timeout(limit, ask(me.leader_addr.clone())).await {
            Ok(Ok(l)) => l.committed,
            Ok(Err(e)) => return Some(format!("the leader: {e}")),
            Err(_) => return Some(format!("the leader {} did not answer", me.leader_addr)),
        }
    };
    let lag = leader_committed.saturating_sub(me.applied);
    (lag > max_lag).then(|| {
        format!(
            "node {} has applied {} of {leader_committed} committed entries",
            me.node_id, me.applied
        )
    })
}

/// Status as the leader sees it (only the leader knows every node's lag).
async fn status_from_leader(
    c: &mut AdminClient<Channel>,
) -> Result<tonic::Response<StatusReply>, tonic::Status> {
    let r = c.status(Empty {}).await?;
    let s = r.get_ref();
    if s.leader_id != s.node_id && !s.leader_addr.is_empty() {
        let mut st = tonic::Status::unavailable("follower");
        if let Ok(v) = s.leader_addr.parse() {
            st.metadata_mut().insert(sluice_proto::LEADER_METADATA, v);
        }
        return Err(st);
    }
    Ok(r)
}

/// Each member's own view (log, committed and applied index), asked directly; a node that does
/// not answer within a second is left out.
async fn node_views(s: &StatusReply) -> HashMap<u64, StatusReply> {
    let mut out = HashMap::new();
    for n in &s.nodes {
        let ask = async {
            let ch = sluice_proto::connect(&n.addr).await.ok()?;
            AdminClient::new(ch)
                .status(Empty {})
                .await
                .ok()
                .map(|r| r.into_inner())
        };
        if let Ok(Some(v)) = tokio::time::timeout(std::time::Duration::from_secs(1), ask).await {
            out.insert(n.node_id, v);
        }
    }
    out
}

pub fn traffic_json(t: &Option<Traffic>) -> serde_json::Value {
    let t = t.unwrap_or_default();
    serde_json::json!({"received": t.received, "delivered": t.delivered,
        "deferred": t.deferred, "bounced": t.bounced})
}

fn print_status(s: &StatusReply, views: &HashMap<u64, StatusReply>, json: bool) {
    if json {
        let nodes: Vec<_> = s
            .nodes
            .iter()
            .map(|n| {
                let own = views.get(&n.node_id);
                serde_json::json!({
                    "node_id": n.node_id, "addr": n.addr, "voter": n.voter, "matched": n.matched,
                    "lag": n.lag, "reachable": own.is_some(),
                    "last_log_index": own.map(|v| v.last_log_index),
                    "committed": own.map(|v| v.committed),
                    "applied": own.map(|v| v.applied),
                    "term": own.map(|v| v.term),
                })
            })
            .collect();
        let v = serde_json::json!({
            "node_id": s.node_id, "leader_id": s.leader_id, "leader_addr": s.leader_addr, "term": s.term,
            "last_log_index": s.last_log_index, "committed": s.committed, "applied": s.applied, "state": s.state,
            "policy_version": s.policy_version, "queued_messages": s.queued_messages,
            "queued_recipients": s.queued_recipients, "nodes": nodes,
            "snapshot_index": s.snapshot_index, "purged_index": s.purged_index,
            "traffic": {
                "last_minute": traffic_json(&s.last_minute),
                "last_hour": traffic_json(&s.last_hour),
            },
            "policy_version_hex": format!("{:016x}", s.policy_version),
            "workerless": s.workerless.iter().map(|w| serde_json::json!({
                "queue": w.queue, "vmta": w.vmta, "recipients": w.recipients, "source_ips": w.source_ips,
            })).collect::<Vec<_>>(),
            "peers": s.peers.iter().map(|p| serde_json::json!({
                "node": p.node, "policy_version": p.policy_version,
                "policy_version_hex": format!("{:016x}", p.policy_version),
                "last_seen_ms_ago": p.last_seen_ms_ago,
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return;
    }
    println!("leader      node {} at {}", s.leader_id, s.leader_addr);
    println!("term        {}", s.term);
    println!(
        "log index   {}   applied {}   snapshot {}   purged {}",
        s.last_log_index, s.applied, s.snapshot_index, s.purged_index
    );
    println!("policy      version {:016x}", s.policy_version);
    println!(
        "queued      {} messages, {} recipients",
        s.queued_messages, s.queued_recipients
    );
    for (name, t) in [("last minute", &s.last_minute), ("last hour", &s.last_hour)] {
        let t = t.unwrap_or_default();
        println!(
            "{name:<11} {} received, {} delivered, {} deferred, {} bounced",
            t.received, t.delivered, t.deferred, t.bounced
        );
    }
    println!(
        "{:<6} {:<22} {:<8} {:>10} {:>8} {:>10} {:>10} {:>10}",
        "NODE", "ADDRESS", "ROLE", "MATCHED", "LAG", "LOG", "COMMITTED", "APPLIED"
    );
    for n in &s.nodes {
        let lag = if n.lag == u64::MAX {
            "?".to_string()
        } else {
            n.lag.to_string()
        };
        let role = if n.node_id == s.leader_id {
            "leader"
        } else if n.voter {
            "voter"
        } else {
            "learner"
        };
        let own = views.get(&n.node_id);
        let col = |f: fn(&StatusReply) -> u64| {
            own.map(|v| f(v).to_string())
                .unwrap_or_else(|| "down".into())
        };
        println!(
            "{:<6} {:<22} {:<8} {:>10} {:>8} {:>10} {:>10} {:>10}",
            n.node_id,
            n.addr,
            role,
            n.matched,
            lag,
            col(|v| v.last_log_index),
            col(|v| v.committed),
            col(|v| v.applied)
        );
    }
    for w in &s.workerless {
        let need = if w.source_ips.is_empty() {
            "no worker has asked for work lately".to_string()
        } else {
            format!("no live worker owns {}", w.source_ips.join(", "))
        };
        println!(
            "stalled     {}/{}: {} recipients wait; {need}",
            w.queue, w.vmta, w.recipients
        );
    }
    if !s.peers.is_empty() {
        println!("{:<30} {:<18} {:>10}", "NODE", "POLICY VERSION", "SEEN");
        for p in &s.peers {
            let mark = if p.policy_version == s.policy_version {
                ""
            } else {
                "  (behind)"
            };
            println!(
                "{:<30} {:016x}   {:>7}s ago{mark}",
                p.node,
                p.policy_version,
                p.last_seen_ms_ago / 1000
            );
        }
    }
}

pub async fn show(s: ShowCmd) -> anyhow::Result<()> {
    match s {
        ShowCmd::Status { at, json } => {
            let s = on_leader!(at.controller, |c| status_from_leader(&mut c));
            let views = node_views(&s).await;
            print_status(&s, &views, json);
        }
        ShowCmd::Queues { at, json } => {
            let q = on_leader!(at.controller, |c| c.queues(Empty {}));
            if json {
                let rows: Vec<_> = q
                    .queues
                    .iter()
                    .map(|q| serde_json::json!({
                        "queue": q.queue, "vmta": q.vmta, "mode": q.mode, "recipients": q.recipients,
                        "oldest_age_s": q.oldest_age_s, "connections": q.connections,
                        "max_connections": q.max_connections, "rate_used": q.rate_used,
                        "rate_allowed": q.rate_allowed, "last_error": q.last_error,
                        "waiting": q.waiting,
                        "last_hour": traffic_json(&q.last_hour),
                    }))
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&rows).unwrap_or_default()
                );
            } else {
                println!(
                    "{:<32} {:<8} {:>6} {:>8} {:>7} {:>5} {:>10} {:>14}  LAST ERROR",
                    "QUEUE", "MODE", "RCPTS", "OLDEST", "CONN", "WAIT", "RATE", "ALLOWED"
                );
                for r in &q.queues {
                    println!(
                        "{:<32} {:<8} {:>6} {:>7}s {:>3}/{:<3} {:>5} {:>10} {:>14}  {}",
                        format!("{}/{}", r.queue, r.vmta),
                        r.mode,
                        r.recipients,
                        r.oldest_age_s,
                        r.connections,
                        r.max_connections,
                        r.waiting,
                        r.rate_used,
                        r.rate_allowed,
                        r.last_error
                    );
                }
            }
        }
        other => crate::show::view(other).await?,
    }
    Ok(())
}

pub async fn queue_op(op: &str, q: QueueArg) -> anyhow::Result<()> {
    let pattern = q.pattern.clone();
    let sel = || QueueSelector {
        pattern: pattern.clone(),
    };
    let n = match op {
        "pause" => on_leader!(q.at.controller, |c| c.pause(sel())).count,
        "resume" => on_leader!(q.at.controller, |c| c.resume(sel())).count,
        _ => on_leader!(q.at.controller, |c| c.retry_now(sel())).count,
    };
    println!("{op}: {n} queue(s) matched `{}`", q.pattern);
    Ok(())
}

pub async fn delete(d: DeleteArgs) -> anyhow::Result<()> {
    let req = DeleteRequest {
        queue_pattern: d.queue.unwrap_or_default(),
        recipient: d.rcpt.unwrap_or_default(),
        job_id: d.job.unwrap_or_default(),
    };
    let req = &req;
    let n = on_leader!(d.at.controller, |c| c.delete(req.clone())).count;
    println!("deleted {n} recipient(s)");
    Ok(())
}

pub async fn reload(at: ControllerAddr) -> anyhow::Result<()> {
    let r = on_leader!(at.controller, |c| c.reload(ReloadRequest { local: false }));
    for w in &r.warnings {
        eprintln!("{w}");
    }
    println!("policy version {:016x} loaded: {}", r.version, r.summary);
    for f in &r.failed {
        eprintln!("not reloaded on {f}");
    }
    if !r.failed.is_empty() {
        bail!(
            "{} controller(s) kept their previous policy",
            r.failed.len()
        );
    }
    Ok(())
}

/// Streams accounting rows from the node named as CSV, with the row number first.
pub async fn acct(a: crate::AcctArgs) -> anyhow::Result<()> {
    use std::io::Write;
    let mut client = direct(&a.at.controller).await?;
    let fields = if a.fields.is_empty() {
        sluice_common::acct::DEFAULT_FIELDS
            .iter()
            .map(|s| s.to_string())
            .collect()
    } else {
        a.fields
    };
    let mut stream = client
        .accounting(AcctStreamRequest {
            after_seq: a.after,
            fields: fields.clone(),
            records: a.records,
            follow: a.follow,
        })
        .await
        .map_err(status_err)?
        .into_inner();
    let csv = |v: &str| {
        if v.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", v.replace('"', "\"\""))
        } else {
            v.to_string()
        }
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "seq,{}", fields.join(","))?;
    while let Some(row) = stream.message().await.map_err(status_err)? {
        let vals: Vec<String> = row.values.iter().map(|v| csv(v)).collect();
        writeln!(out, "{},{}", row.seq, vals.join(","))?;
        if a.follow {
            out.flush()?;
        }
    }
    Ok(())
}

/// A client for exactly the node named (no leader following).
async fn direct(addr: &str) -> anyhow::Result<AdminClient<Channel>> {
    let ch = sluice_proto::connect(addr)
        .await
        .with_context(|| format!("cannot reach {addr}"))?;
    Ok(AdminClient::new(ch).max_decoding_message_size(1 << 30))
}

fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}

/// Queries exactly the node named (no leader following): replicas are compared this way.
pub async fn debug(d: DebugCmd) -> anyhow::Result<()> {
    match d {
        DebugCmd::List { at } => {
            let r = direct(&at.controller)
                .await?
                .list(Empty {})
                .await
                .map_err(status_err)?
                .into_inner();
            let msgs: Vec<_> = r
                .messages
                .iter()
                .map(|m| serde_json::json!({"id": format!("{:016x}", m.id), "mail_from": m.mail_from, "recipients": m.recipients, "states": m.states, "queue": m.queue, "vmta": m.vmta, "job_id": m.job_id}))
                .collect();
            println!("{}", serde_json::to_string(&msgs)?);
        }
        DebugCmd::AdvanceClock { by, at } => {
            let ms = parse_duration_ms(&by)?;
            let r = direct(&at.controller)
                .await?
                .advance_clock(AdvanceClockRequest { ms })
                .await
                .map_err(status_err)?
                .into_inner();
            println!("{}", r.now_ms);
        }
        DebugCmd::PolicyVersion { at } => {
            let r = direct(&at.controller)
                .await?
                .status(Empty {})
                .await
                .map_err(status_err)?
                .into_inner();
            println!("{:016x}", r.policy_version);
        }
        DebugCmd::Digest { at } => {
            let r = direct(&at.controller)
                .await?
                .digest(Empty {})
                .await
                .map_err(status_err)?
                .into_inner();
            println!(
                "{}",
                serde_json::json!({"digest": r.digest, "applied": r.applied, "messages": r.messages})
            );
        }
    }
    Ok(())
}

/// `90s`, `15m`, `2h`, `1d` or plain milliseconds.
fn parse_duration_ms(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .with_context(|| format!("`{s}` is not a duration like 90s, 15m, 2h or 1d"))?;
    let per = match unit {
        "" | "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => bail!("`{s}`: the unit must be ms, s, m, h or d"),
    };
    Ok(n * per)
}
