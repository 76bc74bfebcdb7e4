//! SMTP and message vocabulary shared by the roles: commands (parse and encode), replies with
//! enhanced codes, the bounded line reader, dot-stuffing and its inverse, and the header
//! scanner.

pub mod command;
pub mod data;
pub mod header;
pub mod line;
pub mod reply;
