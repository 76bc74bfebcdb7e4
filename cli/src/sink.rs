//! `sluice sink`: an ESMTP sink for tests, demos and benchmarks. It accepts and discards mail
//! (or fails on purpose), and records who sent what, when and how, so that tests can prove
//! source IPs, DKIM, TLS and throttles.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Args;
use serde::Serialize;
use sluice_common::smtp::data::unstuff;
use sluice_ingress::smtp::command::{Cmd, parse};
use sluice_ingress::smtp::conn::{Conn, ReadError};
use tokio::net::TcpListener;

#[derive(Args, Clone)]
pub struct SinkArgs {
    /// Addresses to listen on (loopback, or 198.18.0.0/15 inside a test bed's network
    /// namespace), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:2526")]
    pub listen: Vec<SocketAddr>,
    /// Share of recipients answered 451 (0-100).
    #[arg(long, default_value_t = 0.0)]
    pub tempfail_pct: f64,
    /// Share of recipients answered 550 (0-100).
    #[arg(long, default_value_t = 0.0)]
    pub permfail_pct: f64,
    /// Delay before answering the end of data, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Delay before answering MAIL, in milliseconds (a receiver slow on commands).
    #[arg(long, default_value_t = 0)]
    pub mail_latency_ms: u64,
    /// Offer STARTTLS with a self-signed certificate (or the one given by --tls-cert/--tls-key).
    #[arg(long)]
    pub tls: bool,
    /// Certificate chain (PEM) to offer with STARTTLS instead of a self-signed one.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Do not offer PIPELINING.
    #[arg(long)]
    pub no_pipelining: bool,
    /// Offer DSN (RFC 3461), so that senders pass on NOTIFY, ORCPT, RET and ENVID.
    #[arg(long)]
    pub dsn: bool,
    /// Write each received message here, with X-Sink-* headers naming the peer and TLS.
    #[arg(long)]
    pub save_dir: Option<PathBuf>,
    /// Write counters and per-queue records here as JSON, every second and at exit.
    #[arg(long)]
    pub stats: Option<PathBuf>,
    /// Answer these recipients with a fixed reply: `ADDRESS=CODE TEXT` (repeat).
    #[arg(long = "reply")]
    pub replies: Vec<String>,
    /// Answer the greeting with this instead of 220 (e.g. "421 4.3.2 busy").
    #[arg(long)]
    pub greeting: Option<String>,
    /// After answering DATA with 354, stop reading: a sender with more than the socket
    /// buffers hold can never finish sending (a receiver stalled mid-transfer).
    #[arg(long)]
    pub stall_data: bool,
}

#[derive(Default, Serialize)]
struct ListenerRecord {
    /// The most connections open at once to this address, from accept to close.
    max_concurrent: u64,
    #[serde(skip)]
    current: u64,
    /// Connections accepted, and when (ms since the epoch).
    connections: u64,
    connect_times_ms: Vec<u64>,
}

#[derive(Default, Serialize)]
struct QueueRecord {
    max_concurrent: u64,
    #[serde(skip)]
    current: u64,
    /// Arrival times (ms since the epoch) of accepted messages.
    timestamps_ms: Vec<u64>,
}

#[derive(Default, Serialize)]
struct Stats {
    connections: u64,
    messages: u64,
    recipients: u64,
    temp_failures: u64,
    perm_failures: u64,
    tls_sessions: u64,
    /// Arrival of the first and the last accepted message (ms since the epoch).
    first_ms: u64,
    last_ms: u64,
    /// Injection-to-arrival times of messages that carry `X-Sluice-Gen` (from `sluice gen`).
    latencies_ms: Vec<u64>,
    /// Keyed by "SOURCE-IP RECIPIENT-DOMAIN".
    queues: BTreeMap<String, QueueRecord>,
    /// Keyed by listen address: what a receiver on that address saw.
    listeners: BTreeMap<String, ListenerRecord>,
    /// The most connections open at once to all addresses together.
    max_concurrent: u64,
    #[serde(skip)]
    current: u64,
}

/// What the client said before the content.
struct Envelope {
    helo: String,
    from: String,
    params: String,
    rcpts: Vec<String>,
    /// "address PARAM=VALUE ..." for accepted recipients that came with parameters.
    rcpt_params: Vec<String>,
}

struct Sink {
    args: SinkArgs,
    stats: Mutex<Stats>,
    seq: AtomicU64,
    tls: Option<tokio_rustls::TlsAcceptor>,
    fixed: HashMap<String, String>,
}

/// A private folder for the sink's self-signed key.
fn tempfile_dir() -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = std::env::temp_dir().join(format!(
        "sluice-sink-{}-{:016x}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    Ok(dir)
}

fn self_signed(dir: &std::path::Path) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "sink.test".to_string()])?;
    let c = dir.join("sink-cert.pem");
    let k = dir.join("sink-key.pem");
    std::fs::write(&c, cert.cert.pem())?;
    std::fs::write(&k, cert.key_pair.serialize_pem())?;
    sluice_ingress::smtp::conn::tls_acceptor(&c, &k).map_err(anyhow::Error::msg)
}

pub async fn run(args: SinkArgs) -> anyhow::Result<()> {
    for a in &args.listen {
        // 198.18.0.0/15 is set aside for network benchmarks (RFC 2544): the multi-host test
        // bed assigns it only inside namespaces it creates.
        let bench = matches!(a.ip(), std::net::IpAddr::V4(v) if v.octets()[0] == 198 && v.octets()[1] & 0xfe == 18);
        if !a.ip().is_loopback() && !bench {
            anyhow::bail!("the sink listens on loopback or 198.18.0.0/15 only; {a} is neither");
        }
    }
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => {
            Some(sluice_ingress::smtp::conn::tls_acceptor(c, k).map_err(anyhow::Error::msg)?)
        }
        _ if args.tls => {
            let dir = tempfile_dir()?;
            Some(self_signed(&dir)?)
        }
        _ => None,
    };
    if let Some(d) = &args.save_dir {
        std::fs::create_dir_all(d)?;
    }
    let mut fixed = HashMap::new();
    for r in &args.replies {
        let (a, reply) = r
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--reply wants ADDRESS=CODE TEXT, got `{r}`"))?;
        fixed.insert(a.to_ascii_lowercase(), reply.to_string());
    }
    let sink = Arc::new(Sink {
        args: args.clone(),
        stats: Mutex::new(Stats::default()),
        seq: AtomicU64::new(0),
        tls,
        fixed,
    });
    for addr in &args.listen {
        let l =
            listen(*addr, args.stall_data).map_err(|e| anyhow::anyhow!("binding {addr}: {e}"))?;
        println!("sink listening on {addr}");
        let s = sink.clone();
        let local = addr.to_string();
        tokio::spawn(async move {
            while let Ok((sock, peer)) = l.accept().await {
                let _ = sock.set_nodelay(true);
                let s = s.clone();
                let local = local.clone();
                tokio::spawn(async move {
                    s.opened(&local, 1);
                    s.clone()
                        .session(Conn::new(sock, Duration::from_secs(300)), peer)
                        .await;
                    s.opened(&local, -1);
                });
            }
        });
    }
    let writer = sink.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            writer.write_stats();
        }
    });
    crate::shutdown_signal().await;
    sink.write_stats();
    let st = sink.stats.lock().unwrap();
    println!(
        "sink: {} connections, {} messages, {} recipients, {} temporary and {} permanent failures",
        st.connections, st.messages, st.recipients, st.temp_failures, st.perm_failures
    );
    Ok(())
}

/// A listener; a stalling sink keeps small receive buffers so that a sender blocks soon.
fn listen(addr: SocketAddr, small_buffers: bool) -> std::io::Result<TcpListener> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    if small_buffers {
        sock.set_recv_buffer_size(4096)?;
    }
    sock.bind(addr)?;
    sock.listen(1024)
}

/// The `X-Sluice-Gen` injection time in a message's header, if present.
fn gen_time(body: &[u8]) -> Option<u64> {
    let end = body
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(body.len().min(8192));
    let head = std::str::from_utf8(&body[..end]).ok()?;
    head.lines().find_map(|l| {
        l.strip_prefix("X-Sluice-Gen:")
            .and_then(|v| v.trim().parse().ok())
    })
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Sink {
    fn opened(&self, local: &str, delta: i64) {
        let mut st = self.stats.lock().unwrap();
        if delta > 0 {
            st.current += 1;
            st.max_concurrent = st.max_concurrent.max(st.current);
        } else {
            st.current = st.current.saturating_sub(1);
        }
        let l = st.listeners.entry(local.to_string()).or_default();
        if delta > 0 {
            l.current += 1;
            l.max_concurrent = l.max_concurrent.max(l.current);
            l.connections += 1;
            l.connect_times_ms.push(now_ms());
        } else {
            l.current = l.current.saturating_sub(1);
        }
    }

    fn write_stats(&self) {
        let Some(p) = &self.args.stats else { return };
        let json = serde_json::to_string(&*self.stats.lock().unwrap()).unwrap_or_default();
        let tmp = p.with_extension("tmp");
        if std::fs::write(&tmp, json).is_ok() {
            let _ = std::fs::rename(&tmp, p);
        }
    }

    fn rcpt_reply(&self, rcpt: &str) -> String {
        let lower = rcpt.to_ascii_lowercase();
        if let Some(r) = self.fixed.get(&lower) {
            return r.clone();
        }
        let local = lower.split('@').next().unwrap_or("");
        let domain = lower.rsplit('@').next().unwrap_or("");
        if local == "tempfail" || fastrand::f64() * 100.0 < self.args.tempfail_pct {
            return format!("451 4.7.1 {domain}: please try again later (greylisted)");
        }
        if local == "permfail" || fastrand::f64() * 100.0 < self.args.permfail_pct {
            return format!(
                "550 5.1.1 {domain}: the email account that you tried to reach does not exist"
            );
        }
        "250 2.1.5 OK".into()
    }

    async fn session(self: Arc<Self>, mut conn: Conn, peer: SocketAddr) {
        let ip = peer.ip().to_string();
        self.stats.lock().unwrap().connections += 1;
        let mut domains: HashSet<String> = HashSet::new();
        let greeting = self
            .args
            .greeting
            .clone()
            .unwrap_or_else(|| "220 sink.test ESMTP Sluice sink".into());
        conn.reply(&greeting);
        let _ = conn.flush().await;
        if !greeting.starts_with("220") {
            return;
        }
        let mut from: Option<String> = None;
        let mut helo = String::new();
        let mut mail_params = String::new();
        let mut rcpts: Vec<String> = Vec::new();
        let mut rcpt_params: Vec<String> = Vec::new();
        let mut bdat: Vec<u8> = Vec::new();
        let t = Duration::from_secs(300);
        loop {
            let line = match conn.read_line(4096, tokio::time::Instant::now() + t).await {
                Ok(l) => String::from_utf8_lossy(&l.bytes).to_string(),
                Err(ReadError::TooLong) => {
                    conn.reply("500 5.5.2 line too long");
                    continue;
                }
                Err(_) => break,
            };
            let mut body: Option<Vec<u8>> = None;
            match parse(&line) {
                Cmd::Ehlo(name) => {
                    helo = name;
                    let mut ext = vec!["250-sink.test"];
                    if !self.args.no_pipelining {
                        ext.push("250-PIPELINING");
                    }
                    ext.extend([
                        "250-8BITMIME",
                        "250-SMTPUTF8",
                        "250-SIZE 104857600",
                        "250-CHUNKING",
                    ]);
                    if self.args.dsn {
                        ext.push("250-DSN");
                    }
                    if self.tls.is_some() && !conn.is_tls() {
                        ext.push("250-STARTTLS");
                    }
                    ext.push("250 ENHANCEDSTATUSCODES");
                    for e in ext {
                        conn.reply(e);
                    }
                }
                Cmd::Helo(name) => {
                    helo = name;
                    conn.reply("250 sink.test")
                }
                Cmd::StartTls => match &self.tls {
                    Some(acc) if !conn.is_tls() => {
                        conn.reply("220 2.0.0 go ahead");
                        let _ = conn.flush().await;
                        if conn.start_tls(acc, Duration::from_secs(10)).await.is_err() {
                            break;
                        }
                        self.stats.lock().unwrap().tls_sessions += 1;
                        continue;
                    }
                    _ => conn.reply("502 5.5.1 not offered"),
                },
                Cmd::Mail { from: f, params } => {
                    mail_params = params
                        .iter()
                        .map(|(k, v)| match v {
                            Some(v) => format!("{k}={v}"),
                            None => k.clone(),
                        })
                        .collect::<Vec<_>>()
                        .join(" ");
                    from = Some(f);
                    rcpts.clear();
                    rcpt_params.clear();
                    bdat.clear();
                    if self.args.mail_latency_ms > 0 {
                        let _ = conn.flush().await;
                        tokio::time::sleep(Duration::from_millis(self.args.mail_latency_ms)).await;
                    }
                    conn.reply("250 2.1.0 OK");
                }
                Cmd::Rcpt { to, params } => {
                    if from.is_none() {
                        conn.reply("503 5.5.1 MAIL first");
                    } else {
                        let r = self.rcpt_reply(&to);
                        let mut st = self.stats.lock().unwrap();
                        match r.as_bytes()[0] {
                            b'4' => st.temp_failures += 1,
                            b'5' => st.perm_failures += 1,
                            _ => {
                                let domain =
                                    to.rsplit('@').next().unwrap_or("").to_ascii_lowercase();
                                if domains.insert(domain.clone()) {
                                    let q = st.queues.entry(format!("{ip} {domain}")).or_default();
                                    q.current += 1;
                                    q.max_concurrent = q.max_concurrent.max(q.current);
                                }
                                if !params.is_empty() {
                                    let p: Vec<String> = params
                                        .iter()
                                        .map(|(k, v)| match v {
                                            Some(v) => format!("{k}={v}"),
                                            None => k.clone(),
                                        })
                                        .collect();
                                    rcpt_params.push(format!("{to} {}", p.join(" ")));
                                }
                                rcpts.push(to);
                            }
                        }
                        drop(st);
                        conn.reply(&r);
                    }
                }
                Cmd::Data => {
                    if rcpts.is_empty() {
                        conn.reply("554 5.5.1 no valid recipients");
                    } else {
                        conn.reply("354 go ahead");
                        let _ = conn.flush().await;
                        if self.args.stall_data {
                            tokio::time::sleep(Duration::from_secs(3600)).await;
                            return self.close(&ip, &domains);
                        }
                        let mut b = Vec::new();
                        let ended = conn
                            .read_data_lines(
                                1 << 20,
                                || tokio::time::Instant::now() + t,
                                |line| {
                                    let Ok((bytes, _)) = line else {
                                        return ControlFlow::Break(false);
                                    };
                                    let Some(c) = unstuff(bytes) else {
                                        return ControlFlow::Break(true);
                                    };
                                    b.extend_from_slice(c);
                                    b.extend_from_slice(b"\r\n");
                                    ControlFlow::Continue(())
                                },
                            )
                            .await;
                        if !matches!(ended, Ok(true)) {
                            return self.close(&ip, &domains);
                        }
                        body = Some(b);
                    }
                }
                Cmd::Bdat { size, last } => {
                    if conn
                        .read_chunk(size, t, tokio::time::Instant::now() + t, |c| {
                            bdat.extend_from_slice(c)
                        })
                        .await
                        .is_err()
                    {
                        break;
                    }
                    if last {
                        body = Some(std::mem::take(&mut bdat));
                    } else {
                        conn.reply("250 2.0.0 chunk OK");
                    }
                }
                Cmd::Rset => {
                    from = None;
                    rcpts.clear();
                    rcpt_params.clear();
                    bdat.clear();
                    conn.reply("250 2.0.0 OK");
                }
                Cmd::Noop => conn.reply("250 2.0.0 OK"),
                Cmd::Quit => {
                    conn.reply("221 2.0.0 bye");
                    let _ = conn.flush().await;
                    break;
                }
                _ => conn.reply("500 5.5.1 not supported by the sink"),
            }
            if let Some(b) = body {
                if self.args.latency_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(self.args.latency_ms)).await;
                }
                let envelope = Envelope {
                    helo: helo.clone(),
                    from: from.take().unwrap_or_default(),
                    params: mail_params.clone(),
                    rcpts: std::mem::take(&mut rcpts),
                    rcpt_params: std::mem::take(&mut rcpt_params),
                };
                self.accept(&ip, &conn, envelope, b);
                conn.reply("250 2.0.0 OK accepted by the sink");
            }
            if !conn.has_buffered() && conn.flush().await.is_err() {
                break;
            }
        }
        self.close(&ip, &domains);
    }

    fn close(&self, ip: &str, domains: &HashSet<String>) {
        let mut st = self.stats.lock().unwrap();
        for d in domains {
            if let Some(q) = st.queues.get_mut(&format!("{ip} {d}")) {
                q.current = q.current.saturating_sub(1);
            }
        }
    }

    fn accept(&self, ip: &str, conn: &Conn, env: Envelope, body: Vec<u8>) {
        let Envelope {
            helo,
            from,
            params,
            rcpts,
            rcpt_params,
        } = env;
        let now = now_ms();
        {
            let mut st = self.stats.lock().unwrap();
            st.messages += 1;
            if st.first_ms == 0 {
                st.first_ms = now;
            }
            st.last_ms = now;
            if let Some(t) = gen_time(&body) {
                st.latencies_ms.push(now.saturating_sub(t));
            }
            st.recipients += rcpts.len() as u64;
            let mut seen = HashSet::new();
            for r in &rcpts {
                let d = r.rsplit('@').next().unwrap_or("").to_ascii_lowercase();
                if seen.insert(d.clone()) {
                    st.queues
                        .entry(format!("{ip} {d}"))
                        .or_default()
                        .timestamps_ms
                        .push(now);
                }
            }
        }
        if let Some(dir) = &self.args.save_dir {
            let n = self.seq.fetch_add(1, Ordering::Relaxed);
            let tls = conn
                .tls_info()
                .map(|(v, c)| format!("{v} {c}"))
                .unwrap_or_else(|| "none".into());
            let mut out = format!(
                "X-Sink-Peer: {ip}\r\nX-Sink-TLS: {tls}\r\nX-Sink-Helo: {helo}\r\n\
                 X-Sink-Mail-From: {from}\r\nX-Sink-Mail-Params: {params}\r\nX-Sink-Rcpt: {}\r\n\
                 X-Sink-Rcpt-Params: {}\r\n",
                rcpts.join(", "),
                rcpt_params.join("; ")
            )
            .into_bytes();
            out.extend_from_slice(&body);
            let _ = std::fs::write(dir.join(format!("{now}-{n:06}.eml")), out);
        }
    }
}
