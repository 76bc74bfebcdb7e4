//! A recipient's fate after an attempt, decided once, here: the worker reports what it saw
//! (the reply and the stage it answered), and the leader decides delivered, retry or bounce
//! from the policy, and which reply-pattern actions follow. The decision travels in the
//! outcome command, so every replica applies the same one.

use sluice_common::policy::{PatternActions, Policy};
use sluice_proto::lease::{Outcome, Stage};

use super::due::effective;
use crate::queue::command::{Attempt, Command, LocalReply, OutcomeKind, QueueKey};
use crate::queue::state::{Modes, MsgRecord};

/// What the lease an outcome came under says about it.
pub struct LeaseView<'a> {
    pub queue: &'a QueueKey,
    pub member: &'a str,
}

/// The reply as recorded: a missing reply becomes a local 451, an assumed delivery a 250.
pub fn attempt(o: &Outcome, assumed: bool) -> Attempt {
    let (code, enhanced, text) = if assumed {
        (
            250,
            "2.0.0".to_string(),
            format!("assumed delivered: {}", o.text),
        )
    } else if o.code == 0 {
        (451, "4.4.2".to_string(), o.text.clone())
    } else {
        (o.code.min(599) as u16, o.enhanced.clone(), o.text.clone())
    };
    Attempt {
        code,
        enhanced,
        text,
        mx_host: o.mx_host.clone(),
        mx_ip: o.mx_ip.clone(),
        source_ip: o.source_ip.clone(),
        tls_version: o.tls_version.clone(),
        tls_cipher: o.tls_cipher.clone(),
        esmtp: o.esmtp,
        next_hop_dsn: o.dsn,
        local: o.local,
    }
}

/// The decision for one recipient.
pub struct Decision {
    pub kind: OutcomeKind,
    pub attempt: Attempt,
    /// The matched smtp-pattern-list rule's actions, if any.
    pub actions: Option<PatternActions>,
}

fn stage(o: &Outcome) -> Stage {
    Stage::try_from(o.stage).unwrap_or(Stage::Local)
}

/// The reply answered DATA, the content or the end of data (the classifier reads this).
fn after_data(o: &Outcome) -> bool {
    matches!(stage(o), Stage::Data | Stage::Content | Stage::EndOfData)
}

/// A bounce, and whether the policy suppresses the address for it (`suppress-on-bounce`).
fn bounced(policy: &Policy, category: String) -> OutcomeKind {
    let suppress = policy
        .global
        .suppress_on_bounce
        .as_ref()
        .is_some_and(|l| l.0.iter().any(|c| c.eq_ignore_ascii_case(&category)));
    OutcomeKind::Bounced { category, suppress }
}

/// Decides one recipient's outcome. `jitter` is a share of the retry wait in [0, 1), drawn by
/// the caller.
pub fn decide(
    policy: &Policy,
    lease: &LeaseView,
    modes: &Modes,
    rec: Option<&MsgRecord>,
    o: &Outcome,
    now: u64,
    jitter: f64,
) -> Decision {
    let backoff = modes.in_backoff(lease.queue, now);
    let rule = effective(policy, &lease.queue.dest, lease.member, backoff);
    // Only a timeout waiting for the reply to the final dot may count as delivered: the
    // message was sent whole. A timeout while sending it never does.
    let assumed = o.local
        && o.timed_out
        && stage(o) == Stage::EndOfData
        && rule
            .assume_delivery_upon_data_termination_timeout
            .unwrap_or(false);
    let attempt = attempt(o, assumed);
    let actions = rule
        .smtp_pattern_list
        .as_deref()
        .and_then(|l| policy.smtp_pattern_lists.get(l))
        .and_then(|l| {
            l.first_match(&format!(
                "{} {} {}",
                attempt.code, attempt.enhanced, attempt.text
            ))
        })
        .map(|r| r.actions.clone());
    let classify = || {
        crate::bounce::classify(
            Some(policy),
            attempt.code,
            &attempt.enhanced,
            &attempt.text,
            after_data(o),
        )
    };
    let code = attempt.code;
    // A 5xx greeting or EHLO is about the connection, not the recipient: retried, unless
    // the policy says `bounce-upon-5xx-greeting`.
    let permanent = code >= 500
        && match stage(o) {
            Stage::Greeting => rule.bounce_upon_5xx_greeting.unwrap_or(false),
            Stage::Connect | Stage::Ehlo | Stage::Starttls => false,
            _ => true,
        };
    let bounce_rcpt = actions
        .as_ref()
        .is_some_and(|a| a.bounce_rcpt || a.bounce_queue);
    let kind = if code < 400 {
        OutcomeKind::Delivered
    } else if permanent || bounce_rcpt {
        bounced(policy, classify())
    } else {
        let received = rec.map(|r| r.received_ms).unwrap_or(now);
        let bounce_after = rule
            .bounce_after
            .map(|d| d.secs() * 1000)
            .unwrap_or(u64::MAX);
        let expires = received.saturating_add(bounce_after);
        if now >= expires {
            bounced(policy, "message-expired".into())
        } else {
            let attempts = rec
                .and_then(|r| r.rcpts.get(o.rcpt_index as usize))
                .map(|r| r.attempts as usize)
                .unwrap_or(0);
            let schedule = rule.retry_after.map(|l| l.0).unwrap_or_default();
            let wait = schedule
                .get(attempts)
                .or(schedule.last())
                .map(|d| d.secs() * 1000)
                .unwrap_or(600_000);
            let extra = (wait as f64 * jitter) as u64;
            // Never retry past the expiry: the last attempt lands on it, and then bounces.
            OutcomeKind::Transient {
                next_attempt_ms: (now + wait + extra).min(expires),
            }
        }
    };
    Decision {
        kind,
        attempt,
        actions,
    }
}

/// A failure before any recipient was tried (routing, connection, greeting, EHLO, TLS)
/// concerns the whole queue: it gets a `tq` row besides each recipient's `t` row.
pub fn queue_level(o: &Outcome, d: &Decision) -> bool {
    matches!(d.kind, OutcomeKind::Transient { .. })
        && matches!(
            stage(o),
            Stage::Local | Stage::Connect | Stage::Greeting | Stage::Ehlo | Stage::Starttls
        )
}

/// Raft commands for a reply-pattern rule's queue-wide actions, and for
/// `backoff-to-normal-after-delivery`. Nothing is proposed that would not change anything.
pub fn follow_up(
    policy: &Policy,
    lease: &LeaseView,
    modes: &Modes,
    d: &Decision,
    now: u64,
) -> Vec<Command> {
    let q = lease.queue;
    let rule = policy.domain_settings(&q.dest, Some(lease.member));
    let mut cmds = Vec::new();
    let in_backoff = modes.in_backoff(q, now);
    if matches!(d.kind, OutcomeKind::Delivered)
        && in_backoff
        && rule.backoff_to_normal_after_delivery.unwrap_or(false)
    {
        cmds.push(Command::SetMode {
            queue: q.clone(),
            backoff_until_ms: 0,
        });
    }
    let Some(a) = &d.actions else {
        return cmds;
    };
    match a.backoff {
        Some(true) if !in_backoff => {
            let secs = a
                .backoff_to_normal_after
                .or(rule.backoff_to_normal_after.map(|d| d.secs()))
                .unwrap_or(3600);
            cmds.push(Command::SetMode {
                queue: q.clone(),
                backoff_until_ms: now + secs * 1000,
            });
        }
        Some(false) if in_backoff => cmds.push(Command::SetMode {
            queue: q.clone(),
            backoff_until_ms: 0,
        }),
        _ => {}
    }
    if a.disable_source_ip
        && let Ok(ip) = d.attempt.source_ip.parse()
        && !modes.ip_disabled(&ip, now)
    {
        cmds.push(Command::DisableSourceIp {
            ip,
            until_ms: now + a.reenable_after.unwrap_or(3600) * 1000,
        });
    }
    if a.bounce_queue {
        cmds.push(Command::BounceQueue {
            now_ms: now,
            queue: q.clone(),
            reply: LocalReply {
                code: d.attempt.code,
                enhanced: d.attempt.enhanced.clone(),
                text: d.attempt.text.clone(),
                category: match &d.kind {
                    OutcomeKind::Bounced { category, .. } => category.clone(),
                    _ => "other".into(),
                },
            },
        });
    }
    if a.defer_queue {
        let wait = rule
            .retry_after
            .as_ref()
            .and_then(|l| l.0.first())
            .map(|d| d.secs() * 1000)
            .unwrap_or(600_000);
        cmds.push(Command::DeferQueue {
            queue: q.clone(),
            until_ms: now + wait,
        });
    }
    cmds
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(text: &str) -> Policy {
        sluice_common::policy::load_str(std::path::Path::new("/t/p.conf"), text, Default::default())
            .map_err(|e| e.to_string())
            .unwrap()
            .policy
    }

    fn timeout(stage: Stage) -> Outcome {
        Outcome {
            code: 451,
            enhanced: "4.4.2".into(),
            text: "timeout".into(),
            stage: stage as i32,
            timed_out: true,
            local: true,
            ..Default::default()
        }
    }

    #[test]
    fn only_a_timeout_after_the_final_dot_may_count_as_delivered() {
        let p = policy(
            "<domain *>\n assume-delivery-upon-data-termination-timeout yes\n retry-after 10m\n</domain>\n",
        );
        let q = QueueKey {
            dest: "a.test".into(),
            vmta: "v".into(),
        };
        let view = LeaseView {
            queue: &q,
            member: "v",
        };
        let modes = Modes::default();
        let d = decide(
            &p,
            &view,
            &modes,
            None,
            &timeout(Stage::EndOfData),
            1000,
            0.0,
        );
        assert_eq!(d.kind, OutcomeKind::Delivered);
        assert!(d.attempt.text.starts_with("assumed delivered"));
        for stage in [Stage::Content, Stage::Data, Stage::Rcpt, Stage::Greeting] {
            let d = decide(&p, &view, &modes, None, &timeout(stage), 1000, 0.0);
            assert!(
                matches!(d.kind, OutcomeKind::Transient { .. }),
                "{stage:?}: {:?}",
                d.kind
            );
        }
        // Without the directive, not even that one.
        let p = policy("<domain *>\n retry-after 10m\n</domain>\n");
        let d = decide(
            &p,
            &view,
            &modes,
            None,
            &timeout(Stage::EndOfData),
            1000,
            0.0,
        );
        assert!(matches!(d.kind, OutcomeKind::Transient { .. }));
    }

    #[test]
    fn a_5xx_greeting_is_retried_unless_the_policy_says_bounce() {
        let q = QueueKey {
            dest: "a.test".into(),
            vmta: "v".into(),
        };
        let view = LeaseView {
            queue: &q,
            member: "v",
        };
        let o = Outcome {
            code: 554,
            enhanced: "5.7.1".into(),
            text: "go away".into(),
            stage: Stage::Greeting as i32,
            ..Default::default()
        };
        let modes = Modes::default();
        let p = policy("<domain *>\n retry-after 10m\n</domain>\n");
        let d = decide(&p, &view, &modes, None, &o, 1000, 0.0);
        assert!(matches!(d.kind, OutcomeKind::Transient { .. }));
        let p = policy("<domain *>\n bounce-upon-5xx-greeting yes\n</domain>\n");
        let d = decide(&p, &view, &modes, None, &o, 1000, 0.0);
        assert!(matches!(d.kind, OutcomeKind::Bounced { .. }));
        // A 5xx to RCPT bounces.
        let o = Outcome {
            stage: Stage::Rcpt as i32,
            ..o
        };
        let d = decide(&p, &view, &modes, None, &o, 1000, 0.0);
        assert!(matches!(d.kind, OutcomeKind::Bounced { .. }));
    }
}
