//! Apply is a pure function of the log: random sequences of every command are applied to a
//! replica that never stops and to one that is restarted at random points (its state reloaded
//! from RocksDB, or a snapshot of it installed into a new database). After every step both
//! must hold the same records, accounting rows, index, ledger, leases and modes, and give the
//! same results.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};
use rocksdb::DB;

use super::command::*;
use super::layout::{self, no_wal, open_db, open_log};
use super::log_files::{Batch, LogFiles};
use super::records::RecordCache;
use super::state::{QueueState, digest_at};
use super::tx::Tx;
use crate::raft::TypeConfig;
use crate::raft::snapshot;
use crate::raft::store::load_state;
use sluice_common::policy::RecordType;

struct Replica {
    db: Arc<DB>,
    log: Arc<LogFiles>,
    st: QueueState,
    /// Holds bodies for at most this many entries and bytes (`bodies`), so that one replica
    /// stores them often and the other keeps them held.
    hold: (u64, usize),
    /// Bytes of recent records kept (`records`): one replica reads nearly every record from
    /// RocksDB, the other from memory.
    record_cache: usize,
}

impl Replica {
    fn open(dir: &Path, hold: (u64, usize), record_cache: usize) -> Replica {
        let db = open_db(&dir.join("db")).unwrap();
        let log = open_log(&db, &dir.join("log")).unwrap();
        let mut r = Replica {
            db,
            log,
            st: QueueState::default(),
            hold,
            record_cache,
        };
        r.restart();
        r
    }

    /// The state reloaded from RocksDB, with held bodies read back from the log.
    fn restart(&mut self) {
        self.st = load_state(&self.db, &self.log).unwrap();
        (self.st.bodies.hold_entries, self.st.bodies.hold_bytes) = self.hold;
        self.st.records = RecordCache::with_limit(self.record_cache);
    }

    fn apply(&mut self, index: u64, cmd: Command) -> CommandResult {
        let log_id = LogId::new(CommittedLeaderId::new(1, 1), index);
        // The log entry first, as a node appends it before applying it.
        let entry = Entry::<TypeConfig> {
            log_id,
            payload: EntryPayload::Normal(cmd.clone()),
        };
        let mut batch = Batch::default();
        batch.push(index, |w| w.extend_from_slice(&layout::ser(&entry)));
        self.log.append(&batch).unwrap();
        let mut tx = Tx::new(&self.db);
        let r = self.st.apply(&mut tx, index, cmd).unwrap();
        self.st.last_applied = Some(log_id);
        self.st.finish_batch(&mut tx);
        self.db.write_opt(tx.into_batch(), &no_wal()).unwrap();
        r
    }

    /// Everything that must be equal between replicas.
    fn view(&self) -> String {
        let (d, _, msgs) =
            digest_at(&self.db, &self.db.snapshot(), &self.st.bodies.snapshot()).unwrap();
        format!(
            "digest {d} msgs {msgs}\nindex {:?}\nmsgs {:?}\nledger {:?}\nleases {:?}\nmodes {:?}",
            self.st.index.snapshot(),
            self.st.index.msgs_snapshot(),
            self.st.ledger.snapshot(),
            self.st.leases,
            self.st.modes,
        )
    }
}

/// Builds commands that make sense against the never-stopped replica's state, with some that
/// do not (unknown leases, stale reports, repeated tokens).
struct Gen {
    rng: fastrand::Rng,
    now: u64,
    tokens: Vec<u128>,
    next_lease: u64,
}

const DOMAINS: [&str; 3] = ["a.test", "b.test", "c.test"];
const VMTAS: [&str; 2] = ["v1", "pool"];

impl Gen {
    fn pattern(&mut self) -> String {
        match self.rng.u8(0..4) {
            0 => "*".into(),
            1 => format!("{}/*", DOMAINS[self.rng.usize(0..3)]),
            2 => format!("*/{}", VMTAS[self.rng.usize(0..2)]),
            _ => format!(
                "{}/{}",
                DOMAINS[self.rng.usize(0..3)],
                VMTAS[self.rng.usize(0..2)]
            ),
        }
    }

    fn queue(&mut self) -> QueueKey {
        QueueKey {
            dest: DOMAINS[self.rng.usize(0..3)].into(),
            vmta: VMTAS[self.rng.usize(0..2)].into(),
        }
    }

    fn ip(&mut self) -> Option<IpAddr> {
        match self.rng.u8(0..3) {
            0 => None,
            n => Some(IpAddr::from([127, 0, 0, n])),
        }
    }

    fn reply(&mut self) -> LocalReply {
        LocalReply {
            code: 550,
            enhanced: "5.1.1".into(),
            text: format!("no such user {}", self.rng.u32(..)),
            category: "bad-mailbox".into(),
        }
    }

    fn enqueue(&mut self) -> Command {
        let mut messages = Vec::new();
        for _ in 0..self.rng.usize(1..4) {
            let token = if !self.tokens.is_empty() && self.rng.u8(0..8) == 0 {
                self.tokens[self.rng.usize(0..self.tokens.len())]
            } else if self.rng.bool() {
                let t = self.rng.u128(1..);
                self.tokens.push(t);
                t
            } else {
                0
            };
            let vmta = VMTAS[self.rng.usize(0..2)].to_string();
            let mut queues: Vec<QueueKey> = Vec::new();
            let mut recipients = Vec::new();
            for i in 0..self.rng.usize(1..5) {
                let d = DOMAINS[self.rng.usize(0..3)];
                let key = QueueKey {
                    dest: d.into(),
                    vmta: vmta.clone(),
                };
                let q = match queues.iter().position(|k| *k == key) {
                    Some(q) => q,
                    None => {
                        queues.push(key);
                        queues.len() - 1
                    }
                };
                recipients.push(NewRecipient {
                    address: format!("u{i}-{}@{d}", self.rng.u16(..)),
                    orcpt: String::new(),
                    // Without NOTIFY, or SUCCESS, DELAY and FAILURE, or NEVER.
                    notify: [0, 7, 8][self.rng.usize(0..3)],
                    queue: q as u32,
                    suppressed: (self.rng.u8(0..10) == 0).then(|| "operator".to_string()),
                });
            }
            messages.push(NewMessage {
                token,
                mail_from: "s@example.com".into(),
                recipients,
                queues,
                envid: String::new(),
                ret: String::new(),
                job_id: format!("job{}", self.rng.u8(0..3)),
                received_by: "in1".into(),
                client_ip: "127.0.0.1".into(),
                priority: 0,
                verp: self.rng.u8(0..4) == 0,
                acct_headers: vec![("subject".into(), "hi".into())],
                body: vec![b'x'; self.rng.usize(10..200)].into(),
            });
        }
        Command::Enqueue {
            now_ms: self.now,
            messages,
        }
    }

    fn next(&mut self, st: &QueueState) -> Command {
        // Time moves: mostly seconds, sometimes hours (ledger and accounting retention).
        self.now += match self.rng.u8(0..20) {
            0 => self.rng.u64(3_600_000..30 * 3_600_000),
            1..=3 => self.rng.u64(60_000..1_200_000),
            _ => self.rng.u64(0..5_000),
        };
        let now = self.now;
        let leases: Vec<u64> = st.leases.keys().copied().collect();
        let pick_lease = |rng: &mut fastrand::Rng| -> u64 {
            if leases.is_empty() || rng.u8(0..10) == 0 {
                rng.u64(1..1_000_000)
            } else {
                leases[rng.usize(0..leases.len())]
            }
        };
        match self.rng.u8(0..16) {
            0..=3 => self.enqueue(),
            4..=6 => {
                let queue = self.queue();
                let mut parts = st.index.ready_parts(&queue);
                self.rng.shuffle(&mut parts);
                parts.truncate(self.rng.usize(0..6));
                if self.rng.u8(0..5) == 0 {
                    parts.push((self.rng.u64(1..1 << 40), 0));
                }
                let more = !leases.is_empty() && self.rng.u8(0..3) == 0;
                let lease_id = if more {
                    pick_lease(&mut self.rng)
                } else {
                    self.next_lease += 1;
                    self.next_lease
                };
                let worker = match st.leases.get(&lease_id) {
                    Some(l) if self.rng.u8(0..6) != 0 => l.worker.clone(),
                    _ => format!("w{}", self.rng.u8(0..2)),
                };
                Command::Lease {
                    now_ms: now,
                    lease_id,
                    worker,
                    expires_ms: now + 30_000,
                    queue,
                    member: ["v1", "v2", ""][self.rng.usize(0..3)].into(),
                    source_ip: self.ip(),
                    new_connection: !more,
                    parts,
                }
            }
            7..=9 => {
                let lease = pick_lease(&mut self.rng);
                let mut outcomes = Vec::new();
                if let Some(l) = st.leases.get(&lease) {
                    for p in &l.parts {
                        let Some(m) = st.index.msgs.get(&p.msg) else {
                            continue;
                        };
                        let _ = m;
                        for rcpt in 0..4u32 {
                            if self.rng.bool() {
                                continue;
                            }
                            let kind = match self.rng.u8(0..3) {
                                0 => OutcomeKind::Delivered,
                                1 => OutcomeKind::Transient {
                                    next_attempt_ms: now + self.rng.u64(0..600_000),
                                },
                                _ => OutcomeKind::Bounced {
                                    category: "bad-mailbox".into(),
                                    suppress: self.rng.bool(),
                                },
                            };
                            outcomes.push(RecipientOutcome {
                                msg: p.msg,
                                rcpt,
                                // Now and then a report under the wrong lease (stale).
                                lease: if self.rng.u8(0..8) == 0 {
                                    lease + 1
                                } else {
                                    lease
                                },
                                kind,
                                attempt: Attempt {
                                    code: 250,
                                    text: "ok".into(),
                                    mx_host: "mx.test".into(),
                                    tls_version: "TLSv1.3".into(),
                                    ..Default::default()
                                },
                            });
                        }
                    }
                }
                Command::Outcomes {
                    now_ms: now,
                    outcomes,
                }
            }
            10 => Command::Release {
                now_ms: now,
                lease_id: pick_lease(&mut self.rng),
                expired: self.rng.bool(),
            },
            11 if self.rng.bool() => {
                // Notices for owed messages (and now and then for any message, or twice).
                let mut msgs: Vec<u64> = st.index.dsn_owed.iter().copied().collect();
                msgs.extend(st.index.msgs.keys().take(2));
                self.rng.shuffle(&mut msgs);
                msgs.truncate(self.rng.usize(0..4));
                let notices = msgs
                    .into_iter()
                    .map(|msg| {
                        let dsn = match self.enqueue() {
                            Command::Enqueue { mut messages, .. } if self.rng.bool() => {
                                messages.pop()
                            }
                            _ => None,
                        };
                        Notice {
                            msg,
                            kind: [DsnKind::Failure, DsnKind::Delay, DsnKind::Relayed]
                                [self.rng.usize(0..3)],
                            rcpts: (0..4u32).filter(|_| self.rng.bool()).collect(),
                            dsn,
                        }
                    })
                    .collect();
                Command::Notify {
                    now_ms: now,
                    notices,
                }
            }
            11 => {
                let mut parts: Vec<Part> = st.index.msgs.keys().map(|&m| (m, 0)).collect();
                self.rng.shuffle(&mut parts);
                parts.truncate(self.rng.usize(0..4));
                let reply = self.reply();
                Command::Expire {
                    now_ms: now,
                    parts,
                    reply,
                }
            }
            12 => match self.rng.u8(0..3) {
                0 => Command::Delete {
                    now_ms: now,
                    queue_pattern: self.pattern(),
                    recipient: String::new(),
                    job_id: String::new(),
                },
                1 => Command::Delete {
                    now_ms: now,
                    queue_pattern: String::new(),
                    recipient: String::new(),
                    job_id: format!("job{}", self.rng.u8(0..3)),
                },
                _ => Command::BounceQueue {
                    now_ms: now,
                    queue: self.queue(),
                    reply: self.reply(),
                },
            },
            13 if self.rng.u8(0..3) == 0 => {
                let counts = [
                    self.rng.usize(0..3),
                    self.rng.usize(0..2),
                    self.rng.usize(0..2),
                ];
                let rng = &mut self.rng;
                let mut entry = || Suppression {
                    address: format!("u{}@{}", rng.u8(0..4), DOMAINS[0]),
                    scope: ["", "job:job1"][rng.usize(0..2)].into(),
                    reason: "operator".into(),
                    source: String::new(),
                    time_ms: now,
                    expires_ms: [0, now + 1_000][rng.usize(0..2)],
                };
                let add = (0..counts[0]).map(|_| entry()).collect();
                let remove = (0..counts[1])
                    .map(|_| {
                        let e = entry();
                        (e.scope, e.address)
                    })
                    .collect();
                let expire = (0..counts[2])
                    .map(|_| {
                        let e = entry();
                        (e.scope, e.address)
                    })
                    .collect();
                Command::Suppress {
                    now_ms: now,
                    add,
                    remove,
                    expire,
                }
            }
            // A report that came back: rows, and a complaint's entry that may meet one there.
            13 if self.rng.u8(0..4) == 0 => {
                let kind = [
                    RecordType::RemoteBounce,
                    RecordType::RemoteStatus,
                    RecordType::Feedback,
                ][self.rng.usize(0..3)];
                let address = format!("u{}@{}", self.rng.u8(0..4), DOMAINS[0]);
                let events = vec![super::acct_event::AcctEvent {
                    kind,
                    time_ms: now,
                    rcpt: address.clone(),
                    report: Some(Box::new(super::acct_event::ReportFields {
                        feedback_type: "abuse".into(),
                        arrival_ms: now,
                        ..Default::default()
                    })),
                    ..Default::default()
                }];
                let suppress = (kind == RecordType::Feedback)
                    .then(|| Suppression {
                        address,
                        reason: "complaint".into(),
                        source: "f isp.test".into(),
                        time_ms: now,
                        ..Default::default()
                    })
                    .into_iter()
                    .collect();
                Command::Inbound {
                    now_ms: now,
                    token: self.rng.u128(1..4),
                    events,
                    suppress,
                }
            }
            13 => match self.rng.u8(0..2) {
                0 => Command::Pause {
                    pattern: self.pattern(),
                },
                _ => Command::Resume {
                    pattern: self.pattern(),
                },
            },
            14 => match self.rng.u8(0..2) {
                0 => Command::RetryNow {
                    now_ms: now,
                    pattern: self.pattern(),
                },
                _ => Command::DeferQueue {
                    queue: self.queue(),
                    until_ms: now + self.rng.u64(0..3_600_000),
                },
            },
            _ => match self.rng.u8(0..2) {
                0 => Command::SetMode {
                    queue: self.queue(),
                    backoff_until_ms: if self.rng.bool() { now + 60_000 } else { 0 },
                },
                _ => Command::DisableSourceIp {
                    ip: IpAddr::from([127, 0, 0, self.rng.u8(1..3)]),
                    until_ms: if self.rng.bool() { now + 60_000 } else { 0 },
                },
            },
        }
    }
}

/// Replaces `r` by a replica that installed a snapshot of it.
fn via_snapshot(r: &Replica, root: &Path, n: u64) -> Replica {
    let snap_dir = root.join(format!("snap-{n}"));
    snapshot::build(&r.db, &r.log, &snap_dir).unwrap();
    let fresh_dir = root.join(format!("db-{n}"));
    let fresh = open_db(&fresh_dir.join("db")).unwrap();
    let log = open_log(&fresh, &fresh_dir.join("log")).unwrap();
    let mut f = std::fs::File::open(snap_dir.join(snapshot::CURRENT)).unwrap();
    snapshot::install_received(&fresh, &root.join(format!("recv-{n}")), &mut f).unwrap();
    let mut r = Replica {
        db: fresh,
        log,
        st: QueueState::default(),
        hold: r.hold,
        record_cache: r.record_cache,
    };
    r.restart();
    r
}

fn run(seed: u64, steps: usize) -> (u32, u32) {
    let tmp = tempfile::tempdir().unwrap();
    let mut a = Replica::open(&tmp.path().join("a"), (u64::MAX, usize::MAX), usize::MAX);
    let mut b = Replica::open(&tmp.path().join("b"), (5, 2_000), 300);
    let mut g = Gen {
        rng: fastrand::Rng::with_seed(seed),
        now: 1_700_000_000_000,
        tokens: Vec::new(),
        next_lease: 0,
    };
    let mut restarts = (0, 0);
    // (leases that took parts, outcomes applied)
    let mut exercised = (0u32, 0u32);
    for i in 1..=steps as u64 {
        let cmd = g.next(&a.st);
        let what = format!("{cmd:?}");
        let ra = a.apply(i, cmd.clone());
        let rb = b.apply(i, cmd);
        assert_eq!(ra, rb, "seed {seed} step {i}: results differ for {what}");
        match &ra {
            CommandResult::Leased { parts } if !parts.is_empty() => exercised.0 += 1,
            CommandResult::Count(n) if *n > 0 && what.starts_with("Outcomes") => exercised.1 += 1,
            _ => {}
        }
        match g.rng.u8(0..10) {
            0 => {
                b.restart();
                restarts.0 += 1;
            }
            1 => {
                b = via_snapshot(&b, tmp.path(), i);
                restarts.1 += 1;
            }
            _ => {}
        }
        let (va, vb) = (a.view(), b.view());
        assert!(
            va == vb,
            "seed {seed} step {i} after {what}:\nuninterrupted:\n{va}\nrestarted:\n{vb}"
        );
    }
    assert!(restarts.0 > 0 && restarts.1 > 0, "{restarts:?}");
    // The run went through leases and outcomes, not only enqueues and bounces.
    assert!(
        exercised.0 > 0 && exercised.1 > 0,
        "seed {seed}: {exercised:?}"
    );
    exercised
}

#[test]
fn random_commands_give_the_same_state_with_and_without_restarts() {
    let mut total = (0, 0);
    for seed in 1..=8 {
        let (l, o) = run(seed, 300);
        total = (total.0 + l, total.1 + o);
    }
    // Leases that took parts and outcomes that decided recipients, over all seeds.
    assert!(total.0 > 150 && total.1 > 100, "{total:?}");
}
