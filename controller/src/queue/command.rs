//! Commands of the replicated queue: what a Raft entry carries, and what applying it returns.
//! Every value that must be the same on each replica (time, ids) travels in the command.

use serde::{Deserialize, Serialize};

/// One recipient as enqueued.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NewRecipient {
    pub address: String,
    pub orcpt: String,
    pub notify: u8,
    /// Index into `NewMessage::queues`.
    pub queue: u16,
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
    pub mail_from: String,
    pub recipients: Vec<NewRecipient>,
    pub queues: Vec<QueueKey>,
    pub envid: String,
    pub ret: String,
    pub job_id: String,
    pub received_by: String,
    pub client_ip: String,
    pub priority: u8,
    /// (lower-cased name, value) of the headers accounting files record, taken by the leader.
    pub acct_headers: Vec<(String, String)>,
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
}

/// The outcome of one delivery attempt for one recipient.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum OutcomeKind {
    Delivered,
    /// Retry at `next_attempt_ms` (chosen by the leader from the retry schedule).
    Transient {
        next_attempt_ms: u64,
    },
    Bounced {
        category: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RecipientOutcome {
    pub msg: u64,
    pub rcpt: u32,
    pub kind: OutcomeKind,
    pub code: u16,
    pub enhanced: String,
    pub text: String,
    pub mx_host: String,
    pub mx_ip: String,
    pub source_ip: String,
    pub tls: String,
    pub esmtp: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum Command {
    /// Enqueue a batch. Ids are derived from the entry's log index and the position.
    Enqueue {
        now_ms: u64,
        messages: Vec<NewMessage>,
    },
    /// Lease message parts of one queue to a worker until `expires_ms`.
    Lease {
        now_ms: u64,
        lease_id: u64,
        worker: String,
        expires_ms: u64,
        queue: QueueKey,
        /// The exact ready entries taken: (next attempt ms, message, part), so that apply
        /// removes each in O(log n) instead of searching the queue.
        parts: Vec<(u64, u64, u16)>,
    },
    /// End a lease: unreported parts become ready again at `now_ms`.
    Release {
        now_ms: u64,
        lease_id: u64,
    },
    /// Record delivery outcomes.
    Outcomes {
        now_ms: u64,
        outcomes: Vec<RecipientOutcome>,
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
    /// Make matching parts ready now.
    RetryNow {
        now_ms: u64,
        pattern: String,
    },
    /// `bounce-queue`: bounce every queued, unleased recipient of a queue with this reply.
    BounceQueue {
        now_ms: u64,
        queue: QueueKey,
        code: u16,
        enhanced: String,
        text: String,
        category: String,
    },
    /// `defer-queue`: nothing in the queue is tried before `until_ms`.
    DeferQueue {
        queue: QueueKey,
        until_ms: u64,
    },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub enum CommandResult {
    #[default]
    None,
    Enqueued {
        ids: Vec<u64>,
    },
    Count(u64),
}
