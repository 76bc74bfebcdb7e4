//! Code shared by Sluice's roles: the policy language, node settings, logging and the
//! accounting column names.

pub mod acct;
pub mod logging;
pub mod policy;
pub mod settings;
