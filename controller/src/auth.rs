//! Who may call what. Under mutual TLS every request carries the caller's identity (role and
//! name from its certificate) and each RPC names the roles it serves; a refusal is
//! PERMISSION_DENIED and a log line naming the peer and its role. Without TLS (loopback, or
//! `insecure_plaintext`) every caller is trusted with every role.

use std::net::IpAddr;

use sluice_proto::tls::{Identity, PeerInfo, Role};
use tonic::{Request, Status};

pub const CONTROLLER: &[Role] = &[Role::Controller];
pub const INGRESS: &[Role] = &[Role::Ingress];
pub const WORKER: &[Role] = &[Role::Worker];
pub const NODE: &[Role] = &[Role::Ingress, Role::Worker];
pub const OPERATOR: &[Role] = &[Role::Operator];
pub const READER: &[Role] = &[Role::Operator, Role::Viewer];
/// What the web monitor shows: a controller's monitor asks the leader with its own
/// certificate, on behalf of a browser that `http-access` let in.
pub const MONITOR_READ: &[Role] = &[Role::Operator, Role::Viewer, Role::Controller];
/// What an `admin` browser may do from the monitor besides reading.
pub const MONITOR_WRITE: &[Role] = &[Role::Operator, Role::Controller];

#[derive(Debug, Clone, Copy)]
pub struct Gate {
    /// Whether this controller serves mutual TLS (then every caller has an identity).
    pub tls: bool,
}

fn describe<T>(req: &Request<T>) -> String {
    req.extensions()
        .get::<PeerInfo>()
        .and_then(|p| p.addr)
        .map(|a| a.to_string())
        .unwrap_or_else(|| "an unknown address".into())
}

impl Gate {
    /// The caller's identity if its role may call `rpc`; None when TLS is off.
    pub fn check<T>(
        &self,
        req: &Request<T>,
        rpc: &str,
        allowed: &[Role],
    ) -> Result<Option<Identity>, Status> {
        if !self.tls {
            return Ok(None);
        }
        let peer = describe(req);
        let Some(id) = req
            .extensions()
            .get::<PeerInfo>()
            .and_then(|p| p.identity.clone())
        else {
            tracing::warn!(%peer, rpc, "refused: no client certificate");
            return Err(Status::unauthenticated(format!(
                "{rpc} needs a client certificate from the cluster's CA"
            )));
        };
        if !allowed.contains(&id.role) {
            let want: Vec<&str> = allowed.iter().map(|r| r.as_str()).collect();
            tracing::warn!(%peer, role = %id.role, name = %id.name, rpc, "refused: wrong role");
            return Err(Status::permission_denied(format!(
                "{rpc} is not for a {} certificate ({}); it needs {}",
                id.role,
                id.name,
                want.join(" or ")
            )));
        }
        Ok(Some(id))
    }

    /// A worker RPC: the caller must be a worker and call itself by its certificate's name.
    pub fn worker<T>(&self, req: &Request<T>, rpc: &str, worker: &str) -> Result<(), Status> {
        if let Some(id) = self.check(req, rpc, WORKER)?
            && id.name != worker
        {
            tracing::warn!(peer = %describe(req), name = %id.name, claimed = worker, rpc,
                "refused: a worker spoke for another");
            return Err(Status::permission_denied(format!(
                "worker certificate `{}` may not act as worker `{worker}`",
                id.name
            )));
        }
        Ok(())
    }

    /// Source IPs a worker registers must be named in its certificate.
    pub fn worker_ips<T>(
        &self,
        req: &Request<T>,
        worker: &str,
        ips: &[IpAddr],
    ) -> Result<(), Status> {
        self.worker(req, "Register", worker)?;
        if let Some(id) = req
            .extensions()
            .get::<PeerInfo>()
            .and_then(|p| p.identity.as_ref())
            && self.tls
        {
            let foreign: Vec<String> = ips
                .iter()
                .filter(|ip| !id.ips.contains(ip))
                .map(|ip| ip.to_string())
                .collect();
            if !foreign.is_empty() {
                tracing::warn!(peer = %describe(req), name = %id.name, ?foreign,
                    "refused: a worker registered source IPs its certificate does not name");
                return Err(Status::permission_denied(format!(
                    "worker `{}` may not send from {}: its certificate does not name {} (issue it with --san IP for each source IP)",
                    id.name,
                    foreign.join(", "),
                    if foreign.len() == 1 { "it" } else { "them" }
                )));
            }
        }
        Ok(())
    }
}
