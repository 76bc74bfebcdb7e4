//! Code shared by Sluice's roles: the policy language, node settings, logging, the
//! accounting column names, delivery status notifications, Prometheus metrics, SMTP commands and message headers, the plain-or-TLS SMTP stream
//! and group commit.

pub mod acct;
pub mod dsn;
pub mod group_commit;
pub mod logging;
pub mod metrics;
pub mod policy;
pub mod privilege;
pub mod returns;
pub mod settings;
pub mod smtp;
pub mod stream;
