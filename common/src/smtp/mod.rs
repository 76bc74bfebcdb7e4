//! SMTP and message vocabulary shared by the roles: command parsing and the header scanner.

pub mod command;
pub mod header;
