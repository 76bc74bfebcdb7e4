//! Raft plumbing: the type configuration, RocksDB storage, and the tonic transport.

pub mod network;
pub mod recent;
pub mod service;
pub mod snapshot;
pub mod store;

use crate::queue::command::{Command, CommandResult};

openraft::declare_raft_types!(
    /// Sluice's Raft types: commands are queue operations, node ids are u64.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = tokio::fs::File,
);

pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig>;
pub type StorageError = openraft::StorageError<NodeId>;

/// Wraps any error as a storage error for openraft.
pub fn io_err(
    subject: openraft::ErrorSubject<NodeId>,
    verb: openraft::ErrorVerb,
    e: impl std::fmt::Display,
) -> StorageError {
    openraft::StorageIOError::new(subject, verb, openraft::AnyError::error(e.to_string())).into()
}
