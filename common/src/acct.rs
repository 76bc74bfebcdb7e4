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

/// Columns a file that takes `f` rows adds to the defaults.
pub const FEEDBACK_FIELDS: &[&str] = &[
    "feedbackType",
    "format",
    "userAgent",
    "reportingMta",
    "reportedDomain",
    "arrivalDate",
    "origIp",
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
    "rcptCount",
    "dlvRetries",
    "lastError",
    "origIpReverse",
    "repeat",
    "node",
];
