//! The replicated queue: commands and the state machine that applies them.

pub mod command;
pub mod state;
