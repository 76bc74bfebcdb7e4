//! The Sluice controller: a Raft group (openraft over RocksDB) whose state machine is the mail
//! queue, the enqueue API for ingress nodes, and the operator API.

pub mod acct;
pub mod admin;
pub mod bounce;
pub mod enqueue;
pub mod group_commit;
pub mod node;
pub mod queue;
pub mod raft;
pub mod scheduler;
