//! The outbound SMTP client: one connection from a bound source IP, ESMTP with PIPELINING,
//! STARTTLS via rustls, SIZE, 8BITMIME and SMTPUTF8 as offered.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use sluice_common::smtp::command::Cmd;
use sluice_common::smtp::line::LineBuffer;
use sluice_common::smtp::reply::{ReadReplyError, read_reply};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;

pub use sluice_common::smtp::data::dot_stuff;
pub use sluice_common::smtp::reply::Reply;

#[derive(Debug)]
pub enum ClientError {
    Connect(String),
    Timeout(&'static str),
    Io(String),
    Protocol(String),
    /// A required TLS certificate did not check out.
    Verify(String),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Connect(e) => write!(f, "connection failed: {e}"),
            ClientError::Timeout(w) => write!(f, "timeout waiting for {w}"),
            ClientError::Io(e) => write!(f, "connection lost: {e}"),
            ClientError::Protocol(e) => write!(f, "protocol error: {e}"),
            ClientError::Verify(e) => write!(f, "{e}"),
        }
    }
}

type Stream = sluice_common::stream::MaybeTls<TlsStream<TcpStream>>;

#[derive(Debug, Default, Clone)]
pub struct Extensions {
    pub pipelining: bool,
    pub size: Option<u64>,
    pub eightbit: bool,
    pub smtputf8: bool,
    pub starttls: bool,
    /// RFC 3461: NOTIFY, ORCPT, RET and ENVID may be passed on.
    pub dsn: bool,
}

pub struct Client {
    stream: Stream,
    lines: LineBuffer,
    pub ext: Extensions,
    pub esmtp: bool,
    pub peer: SocketAddr,
    pub source: IpAddr,
    pub tls: Option<(String, String)>,
    pub timeouts: Timeouts,
}

/// How long a client waits on the server (RFC 5321 4.5.3.2); each is per step, not a total.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// For the reply to each command (EHLO, MAIL, RCPT, DATA, RSET, STARTTLS).
    pub command: Duration,
    /// Without progress while sending the content.
    pub data_send: Duration,
    /// For the reply to the final dot.
    pub data_termination: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            command: Duration::from_secs(300),
            data_send: Duration::from_secs(180),
            data_termination: Duration::from_secs(600),
        }
    }
}

/// Opportunistic TLS between MTAs does not authenticate the server (RFC 7435): the
/// certificate is accepted as presented, while the handshake itself is still verified.
#[derive(Debug)]
struct AcceptAnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// For `require-starttls`: the certificate must chain to the system's roots (or those named by
/// SSL_CERT_FILE / SSL_CERT_DIR) and name the host connected to (the MX name, or the IP of a
/// fixed route).
pub fn verified_connector() -> Result<tokio_rustls::TlsConnector, String> {
    static CONNECTOR: std::sync::OnceLock<Result<tokio_rustls::TlsConnector, String>> =
        std::sync::OnceLock::new();
    CONNECTOR
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            let mut roots = rustls::RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(format!(
                    "no trusted root certificates found ({} errors)",
                    found.errors.len()
                ));
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth();
            Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
        })
        .clone()
}

pub fn tls_connector() -> tokio_rustls::TlsConnector {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

impl Client {
    /// Connects from `source` to `peer` and reads the greeting.
    pub async fn connect(
        source: IpAddr,
        peer: SocketAddr,
        connect_timeout: Duration,
        greeting_timeout: Duration,
    ) -> Result<(Client, Reply), ClientError> {
        let sock = if peer.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|e| ClientError::Connect(e.to_string()))?;
        if source.is_ipv4() == peer.is_ipv4() {
            sock.bind(SocketAddr::new(source, 0))
                .map_err(|e| ClientError::Connect(format!("cannot bind source {source}: {e}")))?;
        }
        let tcp = tokio::time::timeout(connect_timeout, sock.connect(peer))
            .await
            .map_err(|_| ClientError::Timeout("the connection"))?
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let mut c = Client {
            stream: Stream::Plain(tcp),
            lines: LineBuffer::new(),
            ext: Extensions::default(),
            esmtp: false,
            peer,
            source,
            tls: None,
            timeouts: Timeouts::default(),
        };
        let greeting = c.read_reply(greeting_timeout, "the greeting").await?;
        Ok((c, greeting))
    }

    pub async fn read_reply(
        &mut self,
        timeout: Duration,
        what: &'static str,
    ) -> Result<Reply, ClientError> {
        let keep_lines = what == "the EHLO reply";
        let r = tokio::time::timeout(
            timeout,
            read_reply(&mut self.lines, &mut self.stream, keep_lines),
        )
        .await
        .map_err(|_| ClientError::Timeout(what))?
        .map_err(|e| match e {
            ReadReplyError::Malformed(e) => ClientError::Protocol(e),
            ReadReplyError::Closed => ClientError::Io(format!(
                "the server closed the connection while we waited for {what}"
            )),
            ReadReplyError::Io(e) => ClientError::Io(e.to_string()),
        })?;
        crate::metrics::METRICS.reply(r.code);
        Ok(r)
    }

    pub async fn send(&mut self, data: &[u8], timeout: Duration) -> Result<(), ClientError> {
        tokio::time::timeout(timeout, async {
            self.stream.write_all(data).await?;
            self.stream.flush().await
        })
        .await
        .map_err(|_| ClientError::Timeout("sending"))?
        .map_err(|e| ClientError::Io(e.to_string()))
    }

    /// Sends the content; it fails only when no octet moves for `data_send`, so a large
    /// message on a slow link is not cut off while it progresses.
    pub async fn send_content(&mut self, data: &[u8]) -> Result<(), ClientError> {
        let mut sent = 0;
        while sent < data.len() {
            // Each write that moves any octets restarts the clock.
            let n = tokio::time::timeout(self.timeouts.data_send, self.stream.write(&data[sent..]))
                .await
                .map_err(|_| ClientError::Timeout("sending the content"))?
                .map_err(|e| ClientError::Io(e.to_string()))?;
            if n == 0 {
                return Err(ClientError::Io(
                    "the connection closed while sending".into(),
                ));
            }
            sent += n;
        }
        self.send(b"", self.timeouts.data_send).await
    }

    pub async fn command(&mut self, cmd: &Cmd, what: &'static str) -> Result<Reply, ClientError> {
        self.send(cmd.line().as_bytes(), self.timeouts.command)
            .await?;
        self.read_reply(self.timeouts.command, what).await
    }

    /// EHLO, falling back to HELO; records the extensions offered.
    pub async fn hello(&mut self, name: &str) -> Result<Reply, ClientError> {
        let r = self
            .command(&Cmd::Ehlo(name.into()), "the EHLO reply")
            .await?;
        if r.is_positive() {
            self.esmtp = true;
            self.ext = Extensions::default();
            for l in r.text.lines().skip(1) {
                let mut w = l.split_whitespace();
                match w.next().map(|s| s.to_ascii_uppercase()).as_deref() {
                    Some("PIPELINING") => self.ext.pipelining = true,
                    Some("SIZE") => {
                        self.ext.size = w.next().and_then(|s| s.parse().ok()).filter(|&n| n > 0)
                    }
                    Some("8BITMIME") => self.ext.eightbit = true,
                    Some("SMTPUTF8") => self.ext.smtputf8 = true,
                    Some("STARTTLS") => self.ext.starttls = true,
                    Some("DSN") => self.ext.dsn = true,
                    _ => {}
                }
            }
            return Ok(Reply {
                code: r.code,
                enhanced: String::new(),
                text: r.text.lines().next().unwrap_or("").to_string(),
            });
        }
        self.esmtp = false;
        self.ext = Extensions::default();
        self.command(&Cmd::Helo(name.into()), "the HELO reply")
            .await
    }

    /// STARTTLS; with `verify`, the server's certificate must check out (see
    /// `verified_connector`), else opportunistic TLS takes any (RFC 7435).
    pub async fn starttls(
        &mut self,
        server_name: &str,
        timeout: Duration,
        verify: bool,
    ) -> Result<Reply, ClientError> {
        let connector = if verify {
            verified_connector().map_err(ClientError::Verify)?
        } else {
            tls_connector()
        };
        let r = self.command(&Cmd::StartTls, "the STARTTLS reply").await?;
        if r.code != 220 {
            return Ok(r);
        }
        let Stream::Plain(tcp) = std::mem::replace(&mut self.stream, Stream::Gone) else {
            return Err(ClientError::Protocol("TLS already active".into()));
        };
        let name = rustls_pki_types::ServerName::try_from(server_name.to_string())
            .unwrap_or_else(|_| rustls_pki_types::ServerName::IpAddress(self.peer.ip().into()));
        let tls = tokio::time::timeout(timeout, connector.connect(name, tcp))
            .await
            .map_err(|_| ClientError::Timeout("the TLS handshake"))?
            .map_err(|e| {
                if verify && e.get_ref().is_some_and(|i| i.is::<rustls::Error>()) {
                    ClientError::Verify(format!(
                        "TLS certificate of {server_name} not accepted: {e}"
                    ))
                } else {
                    ClientError::Connect(format!("TLS handshake failed: {e}"))
                }
            })?;
        let (_, conn) = tls.get_ref();
        self.tls = Some((
            conn.protocol_version()
                .map(|v| format!("{v:?}"))
                .unwrap_or_default(),
            conn.negotiated_cipher_suite()
                .map(|c| format!("{:?}", c.suite()))
                .unwrap_or_default(),
        ));
        self.stream = Stream::Tls(Box::new(tls));
        self.lines.clear();
        Ok(r)
    }

    pub async fn quit(mut self) {
        let _ = self
            .send(Cmd::Quit.line().as_bytes(), Duration::from_secs(5))
            .await;
        let _ = self
            .read_reply(Duration::from_secs(5), "the QUIT reply")
            .await;
        let _ = self.stream.shutdown().await;
    }
}
