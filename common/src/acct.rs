//! Accounting record columns, as PowerMTA names them, shared by the policy validator and the
//! controller that writes the CSV.

/// Columns written by default, in this order.
pub const DEFAULT_FIELDS: &[&str] = &[
    "type",
    "timeLogged",
    "timeQueued",
    "orig",
    "rcpt",
    "orcpt",
    "dsnAction",
    "dsnStatus",
    "dsnDiag",
    "dsnMta",
    "bounceCat",
    "srcType",
    "srcMta",
    "dlvType",
    "dlvSourceIp",
    "dlvDestinationIp",
    "dlvEsmtpAvailable",
    "dlvSize",
    "vmta",
    "jobId",
    "envId",
    "queue",
    "vmtaPool",
];

/// Optional columns, selectable with `record-fields`.
pub const EXTRA_FIELDS: &[&str] = &[
    "header_*",
    "timeImprinted",
    "envid",
    "srcIp",
    "srcHostname",
    "srcUser",
    "dlvTlsProtocol",
    "dlvTlsCipher",
    "dlvMxHostname",
    "dsnReportingMta",
    "msgId",
    "rcptCount",
    "feedbackType",
    "format",
    "userAgent",
    "reportingMta",
    "reportedDomain",
    "arrivalDate",
    "origIp",
    "origIpReverse",
    "repeat",
    "dlvRetries",
    "lastError",
    "node",
];

/// Every column name Sluice knows.
pub fn all_fields() -> impl Iterator<Item = &'static str> {
    DEFAULT_FIELDS.iter().chain(EXTRA_FIELDS.iter()).copied()
}

pub fn is_known_field(name: &str) -> bool {
    all_fields().any(|f| f.eq_ignore_ascii_case(name))
}

/// Columns Sluice accepts in `record-fields` but has no value for yet: a warning at load names
/// each one used.
pub const EMPTY_FIELDS: &[&str] = &[
    "srcHostname",
    "srcUser",
    "feedbackType",
    "format",
    "userAgent",
    "reportingMta",
    "reportedDomain",
    "arrivalDate",
    "origIp",
    "origIpReverse",
    "repeat",
    "node",
];

/// Record types Sluice does not write yet, and why.
pub fn unwritten_record(code: &str) -> Option<&'static str> {
    match code {
        "f" => Some("feedback-loop reports (ARF) are not processed yet"),
        "rb" => Some("asynchronous bounces are not processed yet"),
        "rs" => Some("remote status reports are not processed yet"),
        _ => None,
    }
}
