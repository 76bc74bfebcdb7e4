//! Wires the controller's gRPC services onto its address: Raft, Queue, Leases and Admin.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sluice_proto::admin::admin_server::AdminServer;
use sluice_proto::lease::leases_server::LeasesServer;
use sluice_proto::queue::queue_server::QueueServer;
use sluice_proto::raft::raft_server::RaftServer;

use crate::enqueue::{Batcher, QueueService};
use crate::node::Controller;

/// Serves every controller API until `shutdown` resolves.
pub async fn serve(
    ctl: Arc<Controller>,
    listener: tokio::net::TcpListener,
    metrics: Option<tokio::net::TcpListener>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let addr = ctl.settings.grpc_listen;
    let r = &ctl.settings.raft;
    // The largest legitimate request: one Raft entry (or one message alone), or an ingress
    // batch, which the same bound limits.
    let rpc_limit = r.max_rpc_bytes() as usize;
    let raft_svc = RaftServer::new(crate::raft::service::RaftService {
        raft: ctl.raft.clone(),
        gate: ctl.gate,
    })
    .max_decoding_message_size(rpc_limit)
    .max_encoding_message_size(rpc_limit);
    let batcher = Batcher::start(
        ctl.raft.clone(),
        r.max_entry_bytes as usize,
        Duration::from_millis(r.commit_timeout_ms),
        Duration::from_millis(r.election_min_ms),
    );
    let queue_svc = QueueServer::new(QueueService {
        ctl: ctl.clone(),
        batcher,
    })
    .max_decoding_message_size(rpc_limit);
    let sched = crate::sched::Scheduler::new(ctl.clone());
    if let Some(l) = metrics {
        let registry = Arc::new(crate::metrics::registry(ctl.clone()));
        let routes =
            sluice_common::metrics::router(registry).merge(crate::monitor::router(ctl.clone()));
        sluice_common::metrics::serve_on(l, routes);
    }
    tokio::spawn(crate::acct::export_loop(ctl.clone()));
    let admin_svc = AdminServer::new(crate::admin::AdminService {
        ctl: ctl.clone(),
        sched: sched.clone(),
    });
    let lease_svc = LeasesServer::new(crate::sched::lease_service::LeaseService { sched })
        .max_decoding_message_size(16 << 20)
        .max_encoding_message_size(rpc_limit);
    let tls = match sluice_proto::client_tls() {
        Some(files) => Some(sluice_proto::tls::server_config(files).map_err(anyhow::Error::msg)?),
        None => None,
    };
    tracing::info!(node = ctl.id, %addr, tls = tls.is_some(), "controller listening");
    tonic::transport::Server::builder()
        .add_service(raft_svc)
        .add_service(queue_svc)
        .add_service(admin_svc)
        .add_service(lease_svc)
        .serve_with_incoming_shutdown(sluice_proto::tls::incoming(listener, tls), shutdown)
        .await
        .context("gRPC server")?;
    let _ = ctl.raft.shutdown().await;
    if let Err(e) = crate::raft::store::settle(&ctl.db, &ctl.state) {
        tracing::warn!(
            "storing the held bodies at shutdown: {e} (the next start reads them from the log)"
        );
    }
    Ok(())
}
