//! The ESMTP server.

pub mod command;
pub mod conn;
pub mod session;

use std::sync::Arc;

use tokio::net::TcpListener;

use crate::Shared;

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
        let local = sock.local_addr().unwrap_or(peer);
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut conn = conn::Conn::new(sock);
            // total-max-smtp-in: refuse politely rather than queueing connections.
            let Ok(permit) = shared.conn_limit.clone().try_acquire_owned() else {
                shared.reject(peer, 'c', "total-max-smtp-in reached");
                conn.reply("421 4.7.0 too many connections; try again later");
                let _ = conn.flush().await;
                return;
            };
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
            session::Session::new(shared, conn, peer, local).run().await;
            drop(permit);
        });
    }
}
