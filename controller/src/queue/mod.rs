//! The replicated queue: commands, the state machine that applies them, and its storage.
//! Nothing outside this module names a column family or builds a key.

pub mod acct_event;
pub mod apply;
pub mod bodies;
pub mod command;
pub mod layout;
pub mod ledger;
pub mod log_files;
pub mod read;
pub mod records;
pub mod state;
pub mod tx;

#[cfg(test)]
pub(crate) mod apply_tests;
#[cfg(test)]
mod restart_equivalence;
