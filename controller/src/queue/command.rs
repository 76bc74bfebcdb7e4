//! Commands of the replicated queue: what a Raft entry carries, and what applying it returns.
//! Every value that must be the same on each replica (time, ids, decisions that depend on the
//! policy) travels in the command; apply never reads a clock or the policy.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
pub use sluice_common::dsn::DsnKind;

use super::acct_event::AcctEvent;

/// One recipient as enqueued.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NewRecipient {
    pub address: String,
    pub orcpt: String,
    pub notify: u8,
    /// Index into `NewMessage::queues`.
    pub queue: u32,
    /// The leader found the address on the suppression list (the entry's reason): the
    /// recipient is bounced at once with category `suppressed`.
    pub suppressed: Option<String>,
}

/// A queue key: destination (domain or rollup name) and VMTA or pool.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueKey {
    pub dest: String,
    pub vmta: String,
}

impl std::fmt::Display for QueueKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.dest, self.vmta)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NewMessage {
    /// The ingress transaction's idempotency token (0: none). A retry of the same transaction
    /// carries the same token and gets the id the first copy got.
    pub token: u128,
    pub mail_from: String,
    pub recipients: Vec<NewRecipient>,
    pub queues: Vec<QueueKey>,
    pub envid: String,
    pub ret: String,
    pub job_id: String,
    pub received_by: String,
    pub client_ip: String,
    pub priority: u8,
    /// One return path per recipient (VERP).
    pub verp: bool,
    /// (lower-cased name, value) of the headers accounting files record, taken by the leader.
    pub acct_headers: Vec<(String, String)>,
    /// `Bytes`, so that the log store's recent entries and the gRPC request share one copy.
    /// Encoded as serde bytes, as the `Vec<u8>` it replaced was.
    pub body: bytes::Bytes,
}

/// What the leader decided for one recipient after a delivery attempt.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum OutcomeKind {
    Delivered,
    /// Retry at `next_attempt_ms` (chosen by the leader from the retry schedule).
    Transient {
        next_attempt_ms: u64,
    },
    Bounced {
        category: String,
        /// The policy puts the address on the suppression list (`suppress-on-bounce`).
        suppress: bool,
    },
}

/// The outcome of one delivery attempt for one recipient, under the lease that held it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Attempt {
    pub code: u16,
    pub enhanced: String,
    pub text: String,
    pub mx_host: String,
    pub mx_ip: String,
    pub source_ip: String,
    pub tls_version: String,
    pub tls_cipher: String,
    pub esmtp: bool,
    /// The receiver offered DSN, so NOTIFY and ORCPT went on with the recipient.
    pub next_hop_dsn: bool,
    /// The worker made this reply itself (no receiver said it).
    pub local: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RecipientOutcome {
    pub msg: u64,
    pub rcpt: u32,
    /// Only the lease that holds the recipient may report it (a late report of an expired
    /// lease is dropped).
    pub lease: u64,
    pub kind: OutcomeKind,
    pub attempt: Attempt,
}

/// A reply Sluice makes itself for recipients it gives up on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LocalReply {
    pub code: u16,
    pub enhanced: String,
    pub text: String,
    pub category: String,
}

/// An address on the suppression list. Scope: "" (every sender), `vmta:NAME`, `pool:NAME`
/// or `job:ID`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Suppression {
    pub address: String,
    pub scope: String,
    /// A bounce category, `complaint` or `operator`.
    pub reason: String,
    /// Where it came from: the accounting record type and message id, or the operator's note.
    pub source: String,
    pub time_ms: u64,
    /// 0: never.
    pub expires_ms: u64,
}

/// One change to the suppression list, as ingress nodes follow it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum SuppressChange {
    Added(Suppression),
    Removed { scope: String, address: String },
}

/// A notice to one message's sender about some of its recipients.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Notice {
    pub msg: u64,
    pub kind: DsnKind,
    pub rcpts: Vec<u32>,
    /// The notice the leader built, or None when the policy sends none (only the `b` rows).
    pub dsn: Option<NewMessage>,
}

/// (message id, part): a part is a message's recipients in one queue.
pub type Part = (u64, u32);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum Command {
    /// Enqueue a batch. Ids are derived from the entry's log index and the position.
    Enqueue {
        now_ms: u64,
        messages: Vec<NewMessage>,
    },
    /// Lease ready parts of one queue to a worker until `expires_ms`: a new connection's
    /// lease, or more parts for an open one (`new_connection` false).
    Lease {
        now_ms: u64,
        lease_id: u64,
        worker: String,
        expires_ms: u64,
        queue: QueueKey,
        /// The VMTA that sends and its source IP: the budgets the lease counts against.
        member: String,
        source_ip: Option<IpAddr>,
        new_connection: bool,
        parts: Vec<Part>,
    },
    /// End a lease: unreported parts become ready again. `expired`: the worker went quiet, so
    /// its unreported messages may have reached the receiver and count against its budgets.
    Release {
        now_ms: u64,
        lease_id: u64,
        expired: bool,
    },
    /// Record delivery outcomes.
    Outcomes {
        now_ms: u64,
        outcomes: Vec<RecipientOutcome>,
    },
    /// Bounce the queued, unleased recipients of these parts: they are past `bounce-after`.
    Expire {
        now_ms: u64,
        parts: Vec<Part>,
        reply: LocalReply,
    },
    /// Delete queued recipients matching a selector (records a `b` row with category `other`).
    Delete {
        now_ms: u64,
        queue_pattern: String,
        recipient: String,
        job_id: String,
    },
    Pause {
        pattern: String,
    },
    Resume {
        pattern: String,
    },
    /// Make matching ready parts due now.
    RetryNow {
        now_ms: u64,
        pattern: String,
    },
    /// `bounce-queue`: bounce every queued, unleased recipient of a queue with this reply.
    BounceQueue {
        now_ms: u64,
        queue: QueueKey,
        reply: LocalReply,
    },
    /// `defer-queue`: nothing in the queue is tried before `until_ms`.
    DeferQueue {
        queue: QueueKey,
        until_ms: u64,
    },
    /// A queue's mode: backoff until `backoff_until_ms`, or normal (0).
    SetMode {
        queue: QueueKey,
        backoff_until_ms: u64,
    },
    /// A source IP out of use until `until_ms` (0: back in use).
    DisableSourceIp {
        ip: IpAddr,
        until_ms: u64,
    },
    /// Add to and remove from the suppression list.
    Suppress {
        now_ms: u64,
        add: Vec<Suppression>,
        /// (scope, address)
        remove: Vec<(String, String)>,
        /// (scope, address): removed only if the stored entry expired by `now_ms` (the
        /// leader's sweep; an entry added again meanwhile stays).
        expire: Vec<(String, String)>,
    },
    /// Notices to senders. Each clears what its recipients were owed (a delay notice marks
    /// them as told) and enqueues the notice; a notice none of whose recipients is owed it any
    /// more (proposed twice) is dropped. Ids as for `Enqueue`.
    Notify {
        now_ms: u64,
        notices: Vec<Notice>,
    },
    /// A delivery attempt that failed for the whole queue (no connection, TLS refused, ...):
    /// a `tq` accounting row.
    QueueFailure {
        now_ms: u64,
        queue: QueueKey,
        member: String,
        attempt: Attempt,
    },
    /// Reports that came back to a `<bounce-processor>` or `<feedback-loop-processor>`
    /// address, as the leader parsed them: `rb`, `rs` and `f` rows, and the addresses the
    /// policy suppresses for them (an entry already there without expiry stays). `token`
    /// (a hash of the report, 0: none) makes a report sent again within the hour tokens are
    /// kept change nothing.
    Inbound {
        now_ms: u64,
        token: u128,
        events: Vec<AcctEvent>,
        suppress: Vec<Suppression>,
    },
}

impl Command {
    /// About how many bytes applying this command writes (to size the write batch; a
    /// message's record, dedup and accounting rows take under 2 KB; the bodies of notices are
    /// written at once, those of enqueued messages are held, `bodies`).
    pub fn write_size_hint(&self) -> usize {
        let message = |m: &NewMessage| 2048 + 256 * m.recipients.len();
        match self {
            Command::Enqueue { messages, .. } => messages.iter().map(message).sum(),
            Command::Notify { notices, .. } => {
                4096 + notices
                    .iter()
                    .flat_map(|n| &n.dsn)
                    .map(|m| m.body.len() + message(m))
                    .sum::<usize>()
            }
            _ => 4096,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub enum CommandResult {
    #[default]
    None,
    Enqueued {
        ids: Vec<u64>,
    },
    /// The parts a lease command actually took.
    Leased {
        parts: Vec<Part>,
    },
    Count(u64),
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_body_is_encoded_as_before_it_was_bytes() {
        // Log entries and records written when the body was a `serde_bytes` Vec<u8>: a u64
        // length, then the bytes. They must decode unchanged.
        let body = bytes::Bytes::from_static(b"abc");
        let encoded = bincode::serialize(&body).unwrap();
        assert_eq!(encoded, [3, 0, 0, 0, 0, 0, 0, 0, b'a', b'b', b'c']);
        assert_eq!(bincode::serialize(&b"abc".to_vec()).unwrap(), encoded);
        let back: bytes::Bytes = bincode::deserialize(&encoded).unwrap();
        assert_eq!(back, body);
    }
}
