//! Apply, command by command: fencing of outcomes by lease, idempotent enqueue, and the
//! index following the stored records.

use std::sync::Arc;

use rocksdb::DB;

use super::command::*;
use super::layout::{no_wal, open_db};
use super::state::{QueueState, RcptState};
use super::tx::Tx;

/// An empty state on a new database (kept while the folder lives).
fn fresh() -> (tempfile::TempDir, Arc<DB>, QueueState) {
    let tmp = tempfile::tempdir().unwrap();
    let db = open_db(tmp.path()).unwrap();
    (tmp, db, QueueState::default())
}

fn apply(db: &Arc<DB>, st: &mut QueueState, index: u64, cmd: Command) -> CommandResult {
    let mut tx = Tx::new(db);
    let r = st.apply(&mut tx, index, cmd).unwrap();
    st.write_meta(&mut tx);
    db.write_opt(tx.into_batch(), &no_wal()).unwrap();
    r
}

pub(crate) fn message(token: u128, rcpts: &[&str]) -> NewMessage {
    NewMessage {
        token,
        mail_from: "s@example.com".into(),
        recipients: rcpts
            .iter()
            .map(|a| NewRecipient {
                address: a.to_string(),
                orcpt: String::new(),
                notify: 0,
                queue: 0,
                suppressed: None,
            })
            .collect(),
        queues: vec![QueueKey {
            dest: "a.test".into(),
            vmta: "v1".into(),
        }],
        envid: String::new(),
        ret: String::new(),
        job_id: String::new(),
        received_by: String::new(),
        client_ip: String::new(),
        priority: 0,
        verp: false,
        acct_headers: Vec::new(),
        body: bytes::Bytes::from_static(b"hello"),
    }
}

/// Queues `messages` as entry 1 and returns their ids.
fn enqueue(db: &Arc<DB>, st: &mut QueueState, now: u64, messages: Vec<NewMessage>) -> Vec<u64> {
    let cmd = Command::Enqueue {
        now_ms: now,
        messages,
    };
    let CommandResult::Enqueued { ids } = apply(db, st, 1, cmd) else {
        panic!()
    };
    ids
}

fn queue() -> QueueKey {
    QueueKey {
        dest: "a.test".into(),
        vmta: "v1".into(),
    }
}

fn lease(now: u64, id: u64, parts: Vec<Part>) -> Command {
    Command::Lease {
        now_ms: now,
        lease_id: id,
        worker: "w1".into(),
        expires_ms: now + 30_000,
        queue: queue(),
        member: "v1".into(),
        source_ip: None,
        new_connection: true,
        parts,
    }
}

fn delivered(msg: u64, rcpt: u32, lease: u64) -> RecipientOutcome {
    RecipientOutcome {
        msg,
        rcpt,
        lease,
        kind: OutcomeKind::Delivered,
        attempt: Attempt {
            code: 250,
            ..Default::default()
        },
    }
}

#[test]
fn a_retried_transaction_is_queued_once() {
    let (_tmp, db, mut st) = fresh();
    let now = 1_700_000_000_000;
    let first = apply(
        &db,
        &mut st,
        1,
        Command::Enqueue {
            now_ms: now,
            messages: vec![message(7, &["x@a.test"])],
        },
    );
    // The same transaction again (a retry after a timeout), in another entry and twice in one.
    let again = apply(
        &db,
        &mut st,
        2,
        Command::Enqueue {
            now_ms: now + 1000,
            messages: vec![
                message(7, &["x@a.test"]),
                message(8, &["y@a.test"]),
                message(8, &["y@a.test"]),
            ],
        },
    );
    let CommandResult::Enqueued { ids: a } = first else {
        panic!()
    };
    let CommandResult::Enqueued { ids: b } = again else {
        panic!()
    };
    assert_eq!(b[0], a[0], "the retry gets the first copy's id");
    assert_eq!(b[1], b[2]);
    assert_eq!(st.index.messages(), 2);
    assert_eq!(st.queued_recipients(), 2);
    // Forgotten after the retention: a new transaction with a reused token is new mail.
    let later = apply(
        &db,
        &mut st,
        3,
        Command::Enqueue {
            now_ms: now + super::apply::TOKEN_RETAIN_MS + 120_000,
            messages: vec![message(7, &["x@a.test"])],
        },
    );
    let CommandResult::Enqueued { ids: c } = later else {
        panic!()
    };
    assert_ne!(c[0], a[0]);
}

#[test]
fn only_the_lease_holding_a_recipient_may_report_it() {
    let (_tmp, db, mut st) = fresh();
    let now = 1_700_000_000_000;
    let ids = enqueue(
        &db,
        &mut st,
        now,
        vec![message(0, &["x@a.test", "y@a.test"])],
    );
    let id = ids[0];
    assert_eq!(
        apply(&db, &mut st, 2, lease(now, 10, vec![(id, 0)])),
        CommandResult::Leased {
            parts: vec![(id, 0)]
        }
    );
    // Taken once only: a second lease of the same part gets nothing.
    assert_eq!(
        apply(&db, &mut st, 3, lease(now, 11, vec![(id, 0)])),
        CommandResult::Leased { parts: vec![] }
    );
    // The lease expires; the part is leased again to another connection.
    apply(
        &db,
        &mut st,
        4,
        Command::Release {
            now_ms: now + 60_000,
            lease_id: 10,
            expired: true,
        },
    );
    assert_eq!(
        apply(&db, &mut st, 5, lease(now + 60_000, 12, vec![(id, 0)])),
        CommandResult::Leased {
            parts: vec![(id, 0)]
        }
    );
    // The first worker's late report changes nothing; the holder's counts.
    assert_eq!(
        apply(
            &db,
            &mut st,
            6,
            Command::Outcomes {
                now_ms: now + 61_000,
                outcomes: vec![delivered(id, 0, 10), delivered(id, 1, 10)],
            },
        ),
        CommandResult::Count(0)
    );
    assert_eq!(st.queued_recipients(), 2);
    assert_eq!(
        apply(
            &db,
            &mut st,
            7,
            Command::Outcomes {
                now_ms: now + 61_000,
                outcomes: vec![delivered(id, 0, 12), delivered(id, 0, 12)],
            },
        ),
        CommandResult::Count(1),
        "a second report of the same recipient changes nothing"
    );
    let rec = super::read::message(&db, id).unwrap().unwrap();
    assert_eq!(rec.rcpts[0].state, RcptState::Delivered);
    assert_eq!(rec.rcpts[1].state, RcptState::Queued);
    let rows = super::read::acct_after(&db, 0, 100).unwrap();
    let d: Vec<_> = rows.iter().filter(|(_, e)| e.kind.code() == "d").collect();
    assert_eq!(d.len(), 1);
}

#[test]
fn reports_of_one_lease_in_one_entry_count_each_part_once_and_store_the_lease() {
    let (_tmp, db, mut st) = fresh();
    let now = 1_700_000_000_000;
    let ids = enqueue(
        &db,
        &mut st,
        now,
        (0..4)
            .map(|i| message(0, &[&format!("r{i}@a.test")]))
            .collect(),
    );
    apply(
        &db,
        &mut st,
        2,
        lease(now, 10, vec![(ids[0], 0), (ids[1], 0)]),
    );
    // More parts for the same connection.
    let mut more = lease(now + 500, 10, vec![(ids[2], 0), (ids[3], 0)]);
    if let Command::Lease { new_connection, .. } = &mut more {
        *new_connection = false;
    }
    apply(&db, &mut st, 3, more);
    assert_eq!(st.leases[&10].parts.len(), 4);
    // Three parts in one entry (one reported twice), then the last.
    assert_eq!(
        apply(
            &db,
            &mut st,
            4,
            Command::Outcomes {
                now_ms: now + 1000,
                outcomes: vec![
                    delivered(ids[0], 0, 10),
                    delivered(ids[1], 0, 10),
                    delivered(ids[1], 0, 10),
                    delivered(ids[2], 0, 10),
                ],
            },
        ),
        CommandResult::Count(3)
    );
    apply(
        &db,
        &mut st,
        5,
        Command::Outcomes {
            now_ms: now + 2000,
            outcomes: vec![delivered(ids[3], 0, 10)],
        },
    );
    let key = super::ledger::BudgetKey::Queue("a.test".into(), "v1".into());
    let u = st.ledger.usage(&key).unwrap();
    assert_eq!(u.msgs.count_since(0), 4, "each part counts once");
    assert_eq!(u.connects.count_since(0), 1, "the connection counts once");
    assert_eq!((u.msgs_out, u.conns_out, u.conns), (0, 0, 1));
    assert!(st.leases[&10].parts.iter().all(|p| p.done));
    // What was stored is what apply holds in memory.
    let loaded = QueueState::load(&db).unwrap();
    assert_eq!(loaded.leases, st.leases);
    assert_eq!(loaded.ledger.snapshot(), st.ledger.snapshot());
}

#[test]
fn commands_in_one_batch_see_each_others_records_whatever_they_read_before() {
    let (_tmp, db, mut st) = fresh();
    let now = 1_700_000_000_000;
    // Queued, leased and reported in one batch, as a leader applies a burst of entries: the
    // record is never in RocksDB before the batch is written.
    let mut tx = Tx::new(&db);
    let CommandResult::Enqueued { ids } = st
        .apply(
            &mut tx,
            1,
            Command::Enqueue {
                now_ms: now,
                messages: vec![message(0, &["x@a.test", "y@a.test"])],
            },
        )
        .unwrap()
    else {
        panic!()
    };
    let id = ids[0];
    st.apply(&mut tx, 2, lease(now, 10, vec![(id, 0)])).unwrap();
    let report = |outcomes| Command::Outcomes {
        now_ms: now + 1000,
        outcomes,
    };
    // A report of an unknown lease reads the record and changes nothing; the next one must
    // still find it.
    assert_eq!(
        st.apply(&mut tx, 3, report(vec![delivered(id, 0, 99)]))
            .unwrap(),
        CommandResult::Count(0)
    );
    assert_eq!(
        st.apply(&mut tx, 4, report(vec![delivered(id, 0, 10)]))
            .unwrap(),
        CommandResult::Count(1)
    );
    st.finish_batch(&mut tx);
    db.write_opt(tx.into_batch(), &no_wal()).unwrap();
    // The next batch reads what this one wrote.
    assert_eq!(
        apply(&db, &mut st, 5, report(vec![delivered(id, 1, 10)])),
        CommandResult::Count(1)
    );
    let rec = super::read::message(&db, id).unwrap().unwrap();
    assert!(rec.rcpts.iter().all(|r| r.state == RcptState::Delivered));
}

#[test]
fn retry_now_and_defer_queue_are_kept_in_the_records() {
    let (_tmp, db, mut st) = fresh();
    let now = 1_700_000_000_000;
    apply(
        &db,
        &mut st,
        1,
        Command::Enqueue {
            now_ms: now,
            messages: vec![message(0, &["x@a.test"]), message(0, &["y@a.test"])],
        },
    );
    apply(
        &db,
        &mut st,
        2,
        Command::DeferQueue {
            queue: queue(),
            until_ms: now + 600_000,
        },
    );
    let reloaded = QueueState::load(&db).unwrap();
    assert_eq!(reloaded.index.heads, vec![now + 600_000]);
    assert_eq!(st.index.snapshot(), reloaded.index.snapshot());
    apply(
        &db,
        &mut st,
        3,
        Command::RetryNow {
            now_ms: now + 1000,
            pattern: "*".into(),
        },
    );
    let reloaded = QueueState::load(&db).unwrap();
    assert_eq!(reloaded.index.heads, vec![now + 1000]);
    assert_eq!(st.index.snapshot(), reloaded.index.snapshot());
}

/// A bounce owes the sender one notice (never for a null sender or NOTIFY=NEVER); the record
/// stays until the notice is enqueued, and a notice proposed twice is enqueued once.
#[test]
fn a_bounce_owes_one_notice_and_the_record_waits_for_it() {
    let (_tmp, db, mut st) = fresh();
    let now = 1_700_000_000_000;
    let mut m = message(0, &["a@a.test", "b@a.test", "c@a.test"]);
    m.recipients[2].notify = sluice_common::dsn::NOTIFY_NEVER;
    let mut null = message(0, &["d@a.test"]);
    null.mail_from = String::new();
    let ids = enqueue(&db, &mut st, now, vec![m, null]);
    let reply = LocalReply {
        code: 554,
        enhanced: "5.4.7".into(),
        text: "expired".into(),
        category: "message-expired".into(),
    };
    apply(
        &db,
        &mut st,
        2,
        Command::Expire {
            now_ms: now + 1,
            parts: vec![(ids[0], 0), (ids[1], 0)],
            reply,
        },
    );
    // Only the first message owes a notice, and only for its first two recipients.
    assert_eq!(
        st.index.dsn_owed.iter().copied().collect::<Vec<_>>(),
        vec![ids[0]]
    );
    assert!(
        !st.index.msgs.contains_key(&ids[1]),
        "the null sender's record is gone"
    );
    let rec = super::read::message(&db, ids[0]).unwrap().unwrap();
    let owed: Vec<u8> = rec.rcpts.iter().map(|r| r.dsn).collect();
    assert_eq!(owed, vec![1, 1, 0]);
    assert_eq!(rec.rcpts[0].last_status, "5.4.7");
    let notice = || Notice {
        msg: ids[0],
        kind: DsnKind::Failure,
        rcpts: vec![0, 1],
        dsn: Some(message(0, &["s@example.com"])),
    };
    let first = apply(
        &db,
        &mut st,
        3,
        Command::Notify {
            now_ms: now + 2,
            notices: vec![notice()],
        },
    );
    assert_eq!(first, CommandResult::Enqueued { ids: vec![3 << 20] });
    assert!(st.index.dsn_owed.is_empty());
    assert!(super::read::message(&db, ids[0]).unwrap().is_none());
    // The same notice again (a new leader that had not seen the first applied): nothing.
    let again = apply(
        &db,
        &mut st,
        4,
        Command::Notify {
            now_ms: now + 3,
            notices: vec![notice()],
        },
    );
    assert_eq!(again, CommandResult::Enqueued { ids: vec![] });
    assert_eq!(st.index.msgs.len(), 1, "only the notice is queued");
}

/// A notice built before part of it went out (an old leader's notice still in the log) is
/// dropped whole, so no recipient is reported twice; the exact notice that follows goes out.
#[test]
fn a_notice_partly_sent_already_is_dropped() {
    let (_tmp, db, mut st) = fresh();
    let now = 1_700_000_000_000;
    let ids = enqueue(
        &db,
        &mut st,
        now,
        vec![message(0, &["a@a.test", "b@a.test"])],
    );
    let reply = LocalReply {
        code: 554,
        enhanced: "5.4.7".into(),
        text: "expired".into(),
        category: "message-expired".into(),
    };
    apply(
        &db,
        &mut st,
        2,
        Command::Expire {
            now_ms: now + 1,
            parts: vec![(ids[0], 0)],
            reply,
        },
    );
    let notice = |rcpts: Vec<u32>| Command::Notify {
        now_ms: now + 2,
        notices: vec![Notice {
            msg: ids[0],
            kind: DsnKind::Failure,
            rcpts,
            dsn: Some(message(0, &["s@example.com"])),
        }],
    };
    let sent = |r: CommandResult| match r {
        CommandResult::Enqueued { ids } => ids.len(),
        _ => panic!(),
    };
    assert_eq!(sent(apply(&db, &mut st, 3, notice(vec![0]))), 1);
    assert_eq!(sent(apply(&db, &mut st, 4, notice(vec![0, 1]))), 0);
    assert!(
        st.index.dsn_owed.contains(&ids[0]),
        "b@ is still owed its notice"
    );
    assert_eq!(sent(apply(&db, &mut st, 5, notice(vec![1]))), 1);
    assert!(st.index.dsn_owed.is_empty());
}
