//! One accounting row as the state machine stores it: written in apply, so that every
//! replica holds the same; `crate::acct` renders it into files.

use serde::{Deserialize, Serialize};
use sluice_common::policy::RecordType;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AcctEvent {
    pub kind: RecordType,
    pub time_ms: u64,
    pub queued_ms: u64,
    pub msg: u64,
    pub orig: String,
    pub rcpt: String,
    pub orcpt: String,
    pub code: u16,
    pub enhanced: String,
    pub diag: String,
    pub category: String,
    pub mx: String,
    pub mx_ip: String,
    pub source_ip: String,
    pub src_mta: String,
    pub client_ip: String,
    pub tls_version: String,
    pub tls_cipher: String,
    pub esmtp: bool,
    pub size: u64,
    /// The VMTA that sent (for a queue of a pool, the member), or the queue's VMTA or pool.
    pub vmta: String,
    /// The pool the sending VMTA was chosen from, if any.
    pub vmta_pool: String,
    /// The queue's destination (domain or rollup).
    pub queue: String,
    pub job_id: String,
    pub envid: String,
    pub headers: Vec<(String, String)>,
    /// What a report that came back said (`f`, `rb` and `rs` rows).
    pub report: Option<Box<ReportFields>>,
}

/// The fields of an inbound report: a feedback-loop complaint, or a remote DSN.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ReportFields {
    pub feedback_type: String,
    /// `arf`, `jmrp`, `unsubscribe` for a complaint; `dsn` or `text` for a bounce.
    pub format: String,
    pub user_agent: String,
    pub reporting_mta: String,
    pub reported_domain: String,
    pub orig_ip: String,
    /// When the reported message arrived at the receiver (0: not said).
    pub arrival_ms: u64,
    /// A remote status's DSN Action (`delivered`, `relayed`, `expanded`, `delayed`).
    pub action: String,
}

impl Default for AcctEvent {
    fn default() -> Self {
        AcctEvent {
            kind: RecordType::Received,
            time_ms: 0,
            queued_ms: 0,
            msg: 0,
            orig: String::new(),
            rcpt: String::new(),
            orcpt: String::new(),
            code: 0,
            enhanced: String::new(),
            diag: String::new(),
            category: String::new(),
            mx: String::new(),
            mx_ip: String::new(),
            source_ip: String::new(),
            src_mta: String::new(),
            client_ip: String::new(),
            tls_version: String::new(),
            tls_cipher: String::new(),
            esmtp: false,
            size: 0,
            vmta: String::new(),
            vmta_pool: String::new(),
            queue: String::new(),
            job_id: String::new(),
            envid: String::new(),
            headers: Vec::new(),
            report: None,
        }
    }
}
