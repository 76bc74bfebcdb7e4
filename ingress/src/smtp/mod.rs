//! The ESMTP server.

pub mod auth_limit;
pub mod conn;
pub mod session;
pub mod table;

pub use sluice_common::smtp::command;

use std::sync::Arc;

use std::time::Duration;

use tokio::net::TcpListener;

use crate::Shared;

/// A session this long without completing a command may be evicted when the node is full.
const EVICT_AFTER_STALL: Duration = Duration::from_secs(2);

/// A session slot for a new client: a free one, or one a stalled session gives up.
async fn admit(shared: &Shared) -> Option<tokio::sync::OwnedSemaphorePermit> {
    let give_up = tokio::time::Instant::now() + EVICT_AFTER_STALL + Duration::from_secs(1);
    loop {
        if let Ok(p) = shared.conn_limit.clone().try_acquire_owned() {
            return Some(p);
        }
        if shared.sessions.evict_stalled(EVICT_AFTER_STALL) {
            // The evicted session's slot comes here: waiters are served first.
            return tokio::time::timeout_at(give_up, shared.conn_limit.clone().acquire_owned())
                .await
                .ok()
                .and_then(Result::ok);
        }
        if tokio::time::Instant::now() >= give_up {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Accepts connections; on an implicit-TLS listener (`smtp-listener ... tls=yes`, SMTPS) the
/// TLS handshake comes before the greeting.
pub async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, implicit_tls: bool) {
    loop {
        let (sock, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = sock.set_nodelay(true);
        crate::metrics::METRICS.connections.inc();
        let local = sock.local_addr().unwrap_or(peer);
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut conn = conn::Conn::new(sock, shared.limits.write_timeout);
            // total-max-smtp-in: the longest-stalled session makes room. When none has
            // stalled yet, one will within EVICT_AFTER_STALL (or the client is refused).
            let permit = admit(&shared).await;
            let Some(permit) = permit else {
                shared.reject(peer, 'c', "total-max-smtp-in reached");
                conn.reply("421 4.7.0 too many connections; try again later");
                let _ = conn.flush().await;
                return;
            };
            // `<source> max-smtp-in`: sessions per client address.
            let Some(_per_ip) = PerIp::take(&shared, peer.ip()) else {
                shared.reject(peer, 'c', "max-smtp-in reached for this address");
                conn.reply("421 4.7.0 too many connections from your address; try again later");
                let _ = conn.flush().await;
                return;
            };
            let entry = shared.sessions.register();
            conn.slot = Some(entry.slot.clone());
            if implicit_tls {
                let Some(acceptor) = shared.tls.clone() else {
                    return;
                };
                if let Err(e) = conn
                    .start_tls(&acceptor, std::time::Duration::from_secs(30))
                    .await
                {
                    tracing::info!(%peer, "implicit TLS handshake failed: {e}");
                    return;
                }
            }
            session::Session::new(shared.clone(), conn, peer, local)
                .run()
                .await;
            drop(entry);
            drop(permit);
        });
    }
}

/// One session counted against its address; the count drops with it.
struct PerIp {
    shared: Arc<Shared>,
    ip: std::net::IpAddr,
}

impl PerIp {
    /// None when the address already holds `max-smtp-in` sessions.
    fn take(shared: &Arc<Shared>, ip: std::net::IpAddr) -> Option<PerIp> {
        let max = shared.policy().source_for_ip(ip).max_smtp_in;
        let mut open = shared.per_ip.lock().unwrap();
        let n = open.entry(ip).or_insert(0);
        if max.is_some_and(|m| *n >= m) {
            if *n == 0 {
                open.remove(&ip);
            }
            return None;
        }
        *n += 1;
        Some(PerIp {
            shared: shared.clone(),
            ip,
        })
    }
}

impl Drop for PerIp {
    fn drop(&mut self) {
        let mut open = self.shared.per_ip.lock().unwrap();
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}
