//! Code shared by Sluice's roles: the policy language, node settings, logging, the
//! accounting column names and the plain-or-TLS SMTP stream.

pub mod acct;
pub mod logging;
pub mod policy;
pub mod settings;
pub mod stream;
