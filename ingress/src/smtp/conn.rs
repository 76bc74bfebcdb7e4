//! A client connection with its own read buffer (the shared bounded line reader), so that
//! lines, BDAT chunks and the STARTTLS switch all see exactly the bytes the client sent.
//! Nothing is buffered without a bound.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use sluice_common::smtp::line::{LineBuffer, TooLong};
use sluice_common::stream::Io;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;

use super::table::Slot;

/// The client's byte stream before TLS: TCP in service, anything in the fuzz target.
pub type Plain = Box<dyn Io>;
pub type Stream = sluice_common::stream::MaybeTls<TlsStream<Plain>, Plain>;

#[derive(Debug)]
pub enum ReadError {
    Closed,
    Timeout,
    /// The node was full and this session, the longest without progress, gave its place.
    Evicted,
    /// The line exceeded the limit; the rest of it up to the next LF was discarded.
    TooLong,
    Io(std::io::Error),
}

/// One line as read: its content without the line ending, and how it ended.
pub struct Line {
    pub bytes: Vec<u8>,
    /// Ended with CRLF (false: bare LF).
    pub crlf: bool,
}

pub struct Conn {
    pub stream: Stream,
    lines: LineBuffer,
    pub out: Vec<u8>,
    /// This session's place in the node's session table (progress and eviction).
    pub slot: Option<Arc<Slot>>,
    /// Bytes arrived since the slot was last touched: in message data the next completed line
    /// touches it (once per read, not once per line, which would read the clock per line).
    unseen: bool,
    write_timeout: Duration,
}

impl Conn {
    pub fn new(s: impl Io + 'static, write_timeout: Duration) -> Self {
        Conn {
            stream: Stream::Plain(Box::new(s)),
            lines: LineBuffer::new(),
            out: Vec::with_capacity(1024),
            slot: None,
            unseen: false,
            write_timeout,
        }
    }

    /// A line or chunk was completed: the session is not stalled.
    fn progressed(&mut self) {
        self.unseen = false;
        if let Some(s) = &self.slot {
            s.touch();
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self.stream, Stream::Tls(_))
    }

    /// Whether the client has sent more than we have read (pipelining).
    pub fn has_buffered(&self) -> bool {
        self.lines.has_buffered()
    }

    async fn fill(&mut self, deadline: Instant) -> Result<(), ReadError> {
        let read = tokio::time::timeout_at(deadline, self.lines.fill(&mut self.stream));
        let read = match &self.slot {
            Some(slot) => tokio::select! {
                r = read => r,
                _ = slot.evicted() => return Err(ReadError::Evicted),
            },
            None => read.await,
        };
        let n = read
            .map_err(|_| ReadError::Timeout)?
            .map_err(ReadError::Io)?;
        if n == 0 {
            return Err(ReadError::Closed);
        }
        self.unseen = true;
        Ok(())
    }

    /// Reads one line of at most `limit` octets (without its ending), which must be complete
    /// by `deadline`: a client trickling bytes does not restart the clock.
    pub async fn read_line(&mut self, limit: usize, deadline: Instant) -> Result<Line, ReadError> {
        self.read_line_with(limit, deadline, |bytes, crlf| Line {
            bytes: bytes.to_vec(),
            crlf,
        })
        .await
    }

    /// Reads one line and hands its content (without the ending) and whether it ended in CRLF
    /// to `f`, straight from the read buffer: message data is not copied line by line.
    pub async fn read_line_with<R>(
        &mut self,
        limit: usize,
        deadline: Instant,
        f: impl FnOnce(&[u8], bool) -> R,
    ) -> Result<R, ReadError> {
        loop {
            match self.lines.next_line(limit) {
                Some(Ok(line)) => {
                    self.progressed();
                    return Ok(f(self.lines.bytes(line), line.crlf));
                }
                Some(Err(TooLong)) => return Err(ReadError::TooLong),
                None => self.fill(deadline).await?,
            }
        }
    }

    /// Hands message data to `f` line by line (the content without its ending and whether it
    /// ended in CRLF, or `TooLong`) until `f` breaks. Every line already buffered is handled
    /// in one call, the deadline is worked out only when a read is needed, and progress is
    /// marked once per read: a buffered line costs neither a clock read nor a trip through
    /// the session's future.
    pub async fn read_data_lines<R>(
        &mut self,
        limit: usize,
        deadline: impl Fn() -> Instant,
        mut f: impl FnMut(Result<(&[u8], bool), TooLong>) -> ControlFlow<R>,
    ) -> Result<R, ReadError> {
        loop {
            while let Some(next) = self.lines.next_line(limit) {
                if self.unseen {
                    self.progressed();
                }
                if let ControlFlow::Break(r) = f(next.map(|l| (self.lines.bytes(l), l.crlf))) {
                    return Ok(r);
                }
            }
            self.fill(deadline()).await?;
        }
    }

    /// Reads exactly `n` octets (BDAT), passing them to `sink` in pieces. Each read must
    /// arrive within `idle` and the whole chunk by `deadline`.
    pub async fn read_chunk(
        &mut self,
        mut n: u64,
        idle: Duration,
        deadline: Instant,
        mut sink: impl FnMut(&[u8]),
    ) -> Result<(), ReadError> {
        while n > 0 {
            if !self.lines.has_buffered() {
                self.fill(deadline.min(Instant::now() + idle)).await?;
            }
            let piece = self.lines.take(n.min(usize::MAX as u64) as usize);
            n -= piece.len() as u64;
            sink(piece);
        }
        self.progressed();
        Ok(())
    }

    pub fn reply(&mut self, text: &str) {
        // A multi-line reply counts once, at its last line.
        if text.as_bytes().get(3) != Some(&b'-') {
            let class = text.as_bytes().first().map_or(0, |c| c.wrapping_sub(b'0')) as u16;
            let class = sluice_common::metrics::reply_class(class * 100);
            crate::metrics::METRICS
                .replies
                .get_or_create(&sluice_common::metrics::label("class", class))
                .inc();
        }
        self.out.extend_from_slice(text.as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    /// Replies waiting to be sent.
    pub fn pending_output(&self) -> usize {
        self.out.len()
    }

    /// Sends the replies; a client that does not read them for the write timeout is dropped.
    pub async fn flush(&mut self) -> std::io::Result<()> {
        let write = async {
            if !self.out.is_empty() {
                self.stream.write_all(&self.out).await?;
                self.out.clear();
            }
            self.stream.flush().await
        };
        tokio::time::timeout(self.write_timeout, write)
            .await
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the client did not read its replies",
                )
            })?
    }

    /// Switches to TLS. Anything the client pipelined after STARTTLS is discarded (RFC 3207).
    pub async fn start_tls(
        &mut self,
        acceptor: &tokio_rustls::TlsAcceptor,
        timeout: Duration,
    ) -> std::io::Result<()> {
        self.lines.clear();
        let Stream::Plain(tcp) = std::mem::replace(&mut self.stream, Stream::Gone) else {
            return Err(std::io::Error::other("TLS is already active"));
        };
        let tls = tokio::time::timeout(timeout, acceptor.accept(tcp))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")
            })
            .and_then(|r| r);
        let result = if tls.is_ok() { "ok" } else { "failed" };
        crate::metrics::METRICS
            .tls
            .get_or_create(&sluice_common::metrics::label("result", result))
            .inc();
        let tls = tls?;
        self.stream = Stream::Tls(Box::new(tls));
        Ok(())
    }

    pub fn tls_info(&self) -> Option<(String, String)> {
        match &self.stream {
            Stream::Tls(s) => {
                let (_, c) = s.get_ref();
                Some((
                    c.protocol_version()
                        .map(|v| format!("{v:?}"))
                        .unwrap_or_default(),
                    c.negotiated_cipher_suite()
                        .map(|c| format!("{:?}", c.suite()))
                        .unwrap_or_default(),
                ))
            }
            _ => None,
        }
    }
}

/// Builds a TLS acceptor from PEM files (certificate chain and private key).
pub fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<tokio_rustls::TlsAcceptor, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("cannot read the certificate {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("bad certificate {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("cannot read the private key {}: {e}", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| format!("the certificate and key do not fit: {e}"))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}
