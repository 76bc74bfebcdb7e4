//! Mutual TLS between Sluice's nodes: TLS 1.3, a client certificate on every connection, and a
//! role in every certificate (a SAN URI `sluice://ROLE/NAME`). The controller learns who
//! calls from the certificate; a client checks that it reached a controller. Certificate and
//! CA files are read again when they change, so a node rotates without a restart (the CA
//! file may hold the old and the new CA at once).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::server::Connected;

/// What a certificate lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Controller,
    Ingress,
    Worker,
    Operator,
    Viewer,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "controller" => Role::Controller,
            "ingress" => Role::Ingress,
            "worker" => Role::Worker,
            "operator" => Role::Operator,
            "viewer" => Role::Viewer,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Controller => "controller",
            Role::Ingress => "ingress",
            Role::Worker => "worker",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who is on the other end, from its certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub role: Role,
    pub name: String,
    /// IP addresses named in the certificate (a worker may register only these, if any).
    pub ips: Vec<IpAddr>,
}

/// The SAN URI that names a role: `sluice://ROLE/NAME`.
pub fn role_uri(role: Role, name: &str) -> String {
    format!("sluice://{role}/{name}")
}

/// The identity a certificate carries, if it names exactly one Sluice role.
pub fn identity_of(cert: &[u8]) -> Result<Identity, String> {
    use x509_parser::prelude::*;
    let (_, x) = X509Certificate::from_der(cert).map_err(|e| format!("bad certificate: {e}"))?;
    let mut ids = Vec::new();
    let mut ips = Vec::new();
    if let Ok(Some(san)) = x.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::URI(u) => {
                    if let Some(rest) = u.strip_prefix("sluice://")
                        && let Some((role, name)) = rest.split_once('/')
                        && let Some(role) = Role::parse(role)
                    {
                        ids.push((role, name.to_string()));
                    }
                }
                GeneralName::IPAddress(b) => match b.len() {
                    4 => ips.push(IpAddr::from(<[u8; 4]>::try_from(*b).expect("4 bytes"))),
                    16 => ips.push(IpAddr::from(<[u8; 16]>::try_from(*b).expect("16 bytes"))),
                    _ => {}
                },
                _ => {}
            }
        }
    }
    match ids.as_slice() {
        [(role, name)] => Ok(Identity {
            role: *role,
            name: name.clone(),
            ips,
        }),
        [] => Err("the certificate names no Sluice role (a SAN URI sluice://ROLE/NAME)".into()),
        _ => Err("the certificate names more than one Sluice role".into()),
    }
}

/// The files a node's TLS comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    pub fn from_paths(files: Option<(PathBuf, PathBuf, PathBuf)>) -> Option<TlsFiles> {
        files.map(|(ca, cert, key)| TlsFiles { ca, cert, key })
    }

    /// The identity this node's own certificate carries (checked at start, so that a node
    /// with a certificate of the wrong role says so at once).
    pub fn identity(&self) -> Result<Identity, String> {
        let certs = read_certs(&self.cert)?;
        identity_of(&certs[0]).map_err(|e| format!("{}: {e}", self.cert.display()))
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in it", path.display()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn read_roots(path: &Path) -> Result<Arc<rustls::RootCertStore>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in read_certs(path)? {
        roots
            .add(c)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(Arc::new(roots))
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// A value built from files, built again when one of them changes (checked at most every
/// two seconds). A file that does not load keeps the previous value, with a log line.
struct Reloading<T> {
    paths: Vec<PathBuf>,
    build: Box<dyn Fn() -> Result<T, String> + Send + Sync>,
    current: Mutex<(Instant, Vec<Option<SystemTime>>, Arc<T>)>,
}

impl<T> Reloading<T> {
    fn new(
        paths: Vec<PathBuf>,
        build: impl Fn() -> Result<T, String> + Send + Sync + 'static,
    ) -> Result<Self, String> {
        let stamps = paths.iter().map(|p| mtime(p)).collect();
        let first = build()?;
        Ok(Reloading {
            paths,
            build: Box::new(build),
            current: Mutex::new((Instant::now(), stamps, Arc::new(first))),
        })
    }

    fn get(&self) -> Arc<T> {
        let mut cur = self.current.lock().unwrap();
        if cur.0.elapsed() >= Duration::from_secs(2) {
            cur.0 = Instant::now();
            let stamps: Vec<_> = self.paths.iter().map(|p| mtime(p)).collect();
            if stamps != cur.1 {
                match (self.build)() {
                    Ok(v) => {
                        tracing::info!(files = ?self.paths, "TLS files changed; reloaded");
                        cur.1 = stamps;
                        cur.2 = Arc::new(v);
                    }
                    Err(e) => tracing::error!("TLS files changed but do not load: {e}"),
                }
            }
        }
        cur.2.clone()
    }
}

impl<T> std::fmt::Debug for Reloading<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Reloading({:?})", self.paths)
    }
}

#[derive(Debug)]
struct CertResolver(Reloading<Arc<CertifiedKey>>);

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some((*self.0.get()).clone())
    }
}

fn certified_key(files: &TlsFiles) -> Result<Arc<CertifiedKey>, String> {
    let certs = read_certs(&files.cert)?;
    let key = provider()
        .key_provider
        .load_private_key(read_key(&files.key)?)
        .map_err(|e| format!("{}: {e}", files.key.display()))?;
    Ok(Arc::new(CertifiedKey::new(certs, key)))
}

/// Checks client certificates against the CA file as it is now.
#[derive(Debug)]
struct ClientVerifier(Reloading<Arc<dyn ClientCertVerifier>>);

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0
            .get()
            .verify_client_cert(end_entity, intermediates, now)?;
        identity_of(end_entity).map_err(rustls::Error::General)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.get().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.get().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.get().supported_verify_schemes()
    }
}

/// The server side: TLS 1.3 only, a client certificate from the cluster's CA required.
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, String> {
    let f = files.clone();
    let resolver = CertResolver(Reloading::new(
        vec![files.cert.clone(), files.key.clone()],
        move || certified_key(&f),
    )?);
    let ca = files.ca.clone();
    let verifier = ClientVerifier(Reloading::new(vec![files.ca.clone()], move || {
        rustls::server::WebPkiClientVerifier::builder_with_provider(read_roots(&ca)?, provider())
            .build()
            .map_err(|e| e.to_string())
    })?);
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Checks that the server's certificate chains to the cluster's CA, names the address dialled,
/// and carries the role expected.
#[derive(Debug)]
struct ServerVerifier {
    inner: Arc<dyn ServerCertVerifier>,
    expect: Role,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?;
        let id = identity_of(end_entity).map_err(rustls::Error::General)?;
        if id.role != self.expect {
            return Err(rustls::Error::General(format!(
                "the server's certificate is a {} certificate ({}), not a {}",
                id.role, id.name, self.expect
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The client side, read from the files now (a new connection sees rotated files).
pub fn client_config(files: &TlsFiles, expect: Role) -> Result<Arc<rustls::ClientConfig>, String> {
    let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
        read_roots(&files.ca)?,
        provider(),
    )
    .build()
    .map_err(|e| e.to_string())?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ServerVerifier { inner, expect }))
        .with_client_auth_cert(read_certs(&files.cert)?, read_key(&files.key)?)
        .map_err(|e| format!("{}: {e}", files.cert.display()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// What a handler knows about the connection a request came on.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub addr: Option<SocketAddr>,
    /// None on a plaintext connection.
    pub identity: Option<Identity>,
}

/// A server connection, plain or TLS, with what is known about its peer.
pub enum ServerConn {
    Plain(TcpStream, PeerInfo),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>, PeerInfo),
}

impl Connected for ServerConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        match self {
            ServerConn::Plain(_, p) | ServerConn::Tls(_, p) => p.clone(),
        }
    }
}

macro_rules! delegate_io {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            ServerConn::Plain($s, _) => {
                let $s = std::pin::Pin::new($s);
                $e
            }
            ServerConn::Tls($s, _) => {
                let $s = std::pin::Pin::new($s.as_mut());
                $e
            }
        }
    };
}

impl tokio::io::AsyncRead for ServerConn {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        delegate_io!(self, s => s.poll_read(cx, buf))
    }
}

impl tokio::io::AsyncWrite for ServerConn {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        delegate_io!(self, s => s.poll_write(cx, buf))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        delegate_io!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        delegate_io!(self, s => s.poll_shutdown(cx))
    }
}

/// Accepted connections for tonic's `serve_with_incoming`: each TLS handshake runs on its
/// own task, with a time limit, so a slow client does not hold up the others.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<ServerConn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(128);
    tokio::spawn(async move {
        loop {
            let (sock, addr) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("gRPC accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = sock.set_nodelay(true);
            let tx = tx.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let conn = match tls {
                    None => ServerConn::Plain(
                        sock,
                        PeerInfo {
                            addr: Some(addr),
                            identity: None,
                        },
                    ),
                    Some(cfg) => {
                        let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
                        let s = match tokio::time::timeout(
                            Duration::from_secs(10),
                            acceptor.accept(sock),
                        )
                        .await
                        {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::warn!(peer = %addr, "TLS handshake refused: {e}");
                                return;
                            }
                            Err(_) => {
                                tracing::warn!(peer = %addr, "TLS handshake timed out");
                                return;
                            }
                        };
                        let identity = s
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .and_then(|c| identity_of(c).ok());
                        ServerConn::Tls(
                            Box::new(s),
                            PeerInfo {
                                addr: Some(addr),
                                identity,
                            },
                        )
                    }
                };
                let _ = tx.send(Ok(conn)).await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// A TLS connector for tonic's `Endpoint::connect_with_connector`. Each new connection reads
/// the certificate files again, so a channel that reconnects after a rotation presents the new
/// certificate and trusts the new CA.
pub fn connector(
    files: TlsFiles,
    expect: Role,
    timeout: Duration,
) -> impl tower::Service<
    http::Uri,
    Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
    Error = std::io::Error,
    Future = impl std::future::Future<
        Output = std::io::Result<
            hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
        >,
    > + Send,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |uri: http::Uri| {
        let files = files.clone();
        async move {
            let config = client_config(&files, expect).map_err(std::io::Error::other)?;
            let host = uri
                .host()
                .unwrap_or("")
                .trim_start_matches('[')
                .trim_end_matches(']');
            let port = uri.port_u16().unwrap_or(443);
            let tcp = tokio::time::timeout(timeout, TcpStream::connect((host, port)))
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
                })??;
            let _ = tcp.set_nodelay(true);
            let name = ServerName::try_from(host.to_string())
                .map_err(|e| std::io::Error::other(format!("bad server name {host}: {e}")))?;
            let tls = tokio::time::timeout(
                timeout + Duration::from_secs(5),
                tokio_rustls::TlsConnector::from(config).connect(name, tcp),
            )
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")
            })??;
            Ok(hyper_util::rt::TokioIo::new(tls))
        }
    })
}
