//! Code shared by Sluice's roles: the policy language, node settings, logging, the
//! accounting column names, the plain-or-TLS SMTP stream and group commit.

pub mod acct;
pub mod group_commit;
pub mod logging;
pub mod policy;
pub mod privilege;
pub mod settings;
pub mod stream;
