//! The Sluice controller: a Raft group (openraft over RocksDB) whose state machine is the mail
//! queue, the enqueue API for ingress nodes, the leader's scheduler and lease API for workers,
//! accounting export, and the operator API.

pub mod acct;
pub mod admin;
pub mod auth;
pub mod bounce;
pub mod clock;
pub mod disk;
pub mod enqueue;
pub mod inbound;
pub mod metrics;
pub mod monitor;
pub mod node;
pub mod queue;
pub mod raft;
pub mod reports;
pub mod sched;
pub mod server;
pub mod suppress;
pub mod traffic;
pub mod views;
