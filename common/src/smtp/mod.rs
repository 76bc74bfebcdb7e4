//! SMTP and message vocabulary shared by the roles: command parsing, replies with enhanced
//! codes, dot-stuffing and its inverse, and the header scanner.

pub mod command;
pub mod data;
pub mod header;
pub mod reply;
