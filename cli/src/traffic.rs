//! `sluice gen`: a traffic generator. It injects over SMTP (pipelined envelope) or HTTP,
//! with a weighted domain mix, and prints throughput and acceptance latency percentiles.
//! Each message carries `X-Sluice-Gen: <unix ms>` so that `sluice sink` can measure the time
//! from injection to delivery.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use sluice_common::smtp::command::Cmd;
use sluice_common::smtp::data::dot_stuff;
use sluice_common::smtp::line::LineBuffer;
use sluice_common::smtp::reply::{Reply, read_reply};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

#[derive(Args, Clone)]
pub struct GenArgs {
    /// Where to inject: the ingress SMTP address (or HTTP with --http).
    #[arg(long, default_value = "127.0.0.1:2525")]
    pub target: SocketAddr,
    /// Concurrent sessions.
    #[arg(long, short = 'c', default_value_t = 10)]
    pub concurrency: usize,
    /// Messages to send in all (ignored with --duration).
    #[arg(long, short = 'n', default_value_t = 1000)]
    pub count: u64,
    /// Send for this many seconds instead of a count.
    #[arg(long)]
    pub duration: Option<u64>,
    /// Body size in bytes.
    #[arg(long, default_value_t = 5120)]
    pub size: usize,
    /// Fill the body with lines of random base64, as an attachment's, instead of repeated
    /// text: it hardly compresses, where the text compresses about 20:1.
    #[arg(long)]
    pub base64_body: bool,
    /// Recipient domain with a weight, `gmail.test:60` (repeat). Default: example.test.
    #[arg(long = "domain")]
    pub domains: Vec<String>,
    /// Spread each domain of the mix over this many subdomains (`d0.DOMAIN` ...), picked at
    /// random per recipient, to queue mail for many destinations.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub spread: u32,
    /// Recipients per message, each with a domain picked from the mix (at most 1,000, what
    /// ingress takes in one transaction).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub rcpts: u16,
    /// Envelope sender.
    #[arg(long, default_value = "gen@example.com")]
    pub from: String,
    /// Add `X-Virtual-MTA: NAME`.
    #[arg(long)]
    pub vmta: Option<String>,
    /// Add `X-Job: ID`.
    #[arg(long)]
    pub job: Option<String>,
    /// Messages per SMTP connection before it is reopened.
    #[arg(long, default_value_t = 100)]
    pub per_connection: u64,
    /// Inject over HTTP (POST /api/inject/v1) instead of SMTP.
    #[arg(long)]
    pub http: bool,
    /// Print a machine-readable summary as JSON on the last line.
    #[arg(long)]
    pub json: bool,
    /// Append the Message-ID of every message answered 250 to this file, one per line, so that
    /// what was acknowledged can be matched with what arrives.
    #[arg(long)]
    pub acked: Option<std::path::PathBuf>,
    /// After a connection error, reconnect and go on instead of ending that session's share
    /// of the traffic; each broken session counts as one refused message.
    #[arg(long)]
    pub keep_going: bool,
}

struct Mix(Vec<(String, u32)>, u32);

impl Mix {
    fn parse(spec: &[String]) -> anyhow::Result<Mix> {
        let mut v = Vec::new();
        for s in spec {
            let (d, w) = s.rsplit_once(':').unwrap_or((s.as_str(), "1"));
            let w: u32 = w
                .parse()
                .map_err(|_| anyhow::anyhow!("--domain wants DOMAIN:WEIGHT, got `{s}`"))?;
            v.push((d.to_string(), w));
        }
        if v.is_empty() {
            v.push(("example.test".into(), 1));
        }
        let total = v.iter().map(|x| x.1).sum::<u32>().max(1);
        Ok(Mix(v, total))
    }

    fn pick(&self) -> &str {
        let mut r = fastrand::u32(..self.1);
        for (d, w) in &self.0 {
            if r < *w {
                return d;
            }
            r -= w;
        }
        &self.0[0].0
    }
}

/// The recipients of message `n`: one per `--rcpts`, each with a domain from the mix.
fn recipients(args: &GenArgs, mix: &Mix, n: u64) -> Vec<String> {
    let domain = || match args.spread {
        1 => mix.pick().to_string(),
        s => format!("d{}.{}", fastrand::u32(..s), mix.pick()),
    };
    match args.rcpts {
        1 => vec![format!("user{}@{}", n % 1000, domain())],
        k => (0..k)
            .map(|i| format!("user{}-{i}@{}", n % 1000, domain()))
            .collect(),
    }
}

fn message_id(n: u64) -> String {
    format!("<gen-{n}-{}@example.com>", fastrand::u64(..))
}

fn body(args: &GenArgs, n: u64, to: &str, id: &str) -> String {
    let mut h = format!(
        "From: <{}>\r\nTo: <{to}>\r\nSubject: sluice gen {n}\r\nMessage-ID: {id}\r\nX-Sluice-Gen: {}\r\n",
        args.from,
        crate::now_ms()
    );
    if let Some(v) = &args.vmta {
        h.push_str(&format!("X-Virtual-MTA: {v}\r\n"));
    }
    if let Some(j) = &args.job {
        h.push_str(&format!("X-Job: {j}\r\n"));
    }
    h.push_str("\r\n");
    if args.base64_body {
        use base64::Engine;
        // 57 random bytes encode to one 76-character line.
        let mut raw = [0u8; 57];
        while h.len() < args.size {
            fastrand::fill(&mut raw);
            base64::engine::general_purpose::STANDARD.encode_string(raw, &mut h);
            h.push_str("\r\n");
        }
        return h;
    }
    let line = "The quick brown fox jumps over the lazy dog, again and again and again.\r\n";
    while h.len() < args.size {
        h.push_str(line);
    }
    h
}

/// The next reply from the ingress.
async fn reply(lines: &mut LineBuffer, stream: &mut TcpStream) -> anyhow::Result<Reply> {
    read_reply(lines, stream, false)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
}

struct Counters {
    next: AtomicU64,
    ok: AtomicU64,
    /// Recipients answered 2xx in messages that were accepted.
    rcpts_ok: AtomicU64,
    failed: AtomicU64,
    latencies: std::sync::Mutex<Vec<u32>>,
    acked: Option<std::sync::Mutex<std::fs::File>>,
}

impl Counters {
    fn accepted(&self, t0: Instant, id: &str) {
        self.ok.fetch_add(1, Ordering::Relaxed);
        self.latencies
            .lock()
            .unwrap()
            .push(t0.elapsed().as_micros() as u32);
        if let Some(f) = &self.acked {
            let _ = writeln!(f.lock().unwrap(), "{id}");
        }
    }
}

/// Whether message `n` is past the end: the --duration deadline, else the --count.
fn finished(args: &GenArgs, n: u64, deadline: Option<Instant>) -> bool {
    deadline.map_or(n >= args.count, |d| Instant::now() >= d)
}

/// One session's share of SMTP traffic; with --keep-going a broken connection is replaced.
async fn smtp_sessions(
    args: Arc<GenArgs>,
    mix: Arc<Mix>,
    c: Arc<Counters>,
    deadline: Option<Instant>,
) -> anyhow::Result<()> {
    loop {
        match smtp_worker(args.clone(), mix.clone(), c.clone(), deadline).await {
            Err(_) if args.keep_going => {
                // The broken session's message (if one was in flight) counts as refused, and
                // the attempt uses up a message, so that an unreachable target ends too.
                c.failed.fetch_add(1, Ordering::Relaxed);
                let n = c.next.fetch_add(1, Ordering::Relaxed);
                if finished(&args, n, deadline) {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            r => return r,
        }
    }
}

async fn smtp_worker(
    args: Arc<GenArgs>,
    mix: Arc<Mix>,
    c: Arc<Counters>,
    deadline: Option<Instant>,
) -> anyhow::Result<()> {
    loop {
        let mut stream = TcpStream::connect(args.target).await?;
        stream.set_nodelay(true)?;
        let mut lines = LineBuffer::new();
        let rd = &mut lines;
        reply(rd, &mut stream).await?;
        let ehlo = Cmd::Ehlo("gen.example.com".into());
        stream.write_all(ehlo.line().as_bytes()).await?;
        reply(rd, &mut stream).await?;
        for _ in 0..args.per_connection {
            let n = c.next.fetch_add(1, Ordering::Relaxed);
            if finished(&args, n, deadline) {
                let _ = stream.write_all(Cmd::Quit.line().as_bytes()).await;
                return Ok(());
            }
            let rcpts = recipients(&args, &mix, n);
            let to = rcpts[0].clone();
            let t0 = Instant::now();
            let mail = Cmd::Mail {
                from: args.from.clone(),
                params: Vec::new(),
            };
            let mut env = mail.line();
            for to in rcpts.iter() {
                let rcpt = Cmd::Rcpt {
                    to: to.clone(),
                    params: Vec::new(),
                };
                env.push_str(&rcpt.line());
            }
            env.push_str(&Cmd::Data.line());
            stream.write_all(env.as_bytes()).await?;
            reply(rd, &mut stream).await?;
            let mut taken = 0;
            for _ in 0..rcpts.len() {
                if reply(rd, &mut stream).await?.code / 100 == 2 {
                    taken += 1;
                }
            }
            if reply(rd, &mut stream).await?.code != 354 {
                c.failed.fetch_add(1, Ordering::Relaxed);
                stream.write_all(Cmd::Rset.line().as_bytes()).await?;
                reply(rd, &mut stream).await?;
                continue;
            }
            let id = message_id(n);
            let data = dot_stuff(&[body(&args, n, &to, &id).as_bytes()]);
            stream.write_all(&data).await?;
            if reply(rd, &mut stream).await?.code == 250 {
                c.rcpts_ok.fetch_add(taken, Ordering::Relaxed);
                c.accepted(t0, &id);
            } else {
                c.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        let _ = stream.write_all(Cmd::Quit.line().as_bytes()).await;
    }
}

async fn http_worker(
    args: Arc<GenArgs>,
    mix: Arc<Mix>,
    c: Arc<Counters>,
    deadline: Option<Instant>,
) -> anyhow::Result<()> {
    let stream = TcpStream::connect(args.target).await?;
    stream.set_nodelay(true)?;
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    loop {
        let n = c.next.fetch_add(1, Ordering::Relaxed);
        if finished(&args, n, deadline) {
            return Ok(());
        }
        let rcpts = recipients(&args, &mix, n);
        let id = message_id(n);
        let payload = serde_json::json!({"envelope_sender": args.from, "recipients": rcpts, "content": body(&args, n, &rcpts[0], &id)}).to_string();
        let req = format!(
            "POST /api/inject/v1 HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{payload}",
            args.target,
            payload.len()
        );
        let t0 = Instant::now();
        wr.write_all(req.as_bytes()).await?;
        let mut status = String::new();
        rd.read_line(&mut status).await?;
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            rd.read_line(&mut h).await?;
            if h == "\r\n" || h.is_empty() {
                break;
            }
            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut buf = vec![0u8; len];
        tokio::io::AsyncReadExt::read_exact(&mut rd, &mut buf).await?;
        if status.contains(" 200 ") {
            // HTTP injection takes every recipient or none.
            c.rcpts_ok.fetch_add(rcpts.len() as u64, Ordering::Relaxed);
            c.accepted(t0, &id);
        } else {
            c.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

pub async fn run(args: GenArgs) -> anyhow::Result<()> {
    let mix = Arc::new(Mix::parse(&args.domains)?);
    let args = Arc::new(args);
    let c = Arc::new(Counters {
        next: AtomicU64::new(0),
        ok: AtomicU64::new(0),
        rcpts_ok: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        latencies: Default::default(),
        acked: match &args.acked {
            Some(p) => Some(std::sync::Mutex::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?,
            )),
            None => None,
        },
    });
    let deadline = args
        .duration
        .map(|s| Instant::now() + Duration::from_secs(s));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let (a, m, c) = (args.clone(), mix.clone(), c.clone());
        tasks.push(tokio::spawn(async move {
            if a.http {
                http_worker(a, m, c, deadline).await
            } else {
                smtp_sessions(a, m, c, deadline).await
            }
        }));
    }
    let progress = {
        let (c, args) = (c.clone(), args.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let done = c.ok.load(Ordering::Relaxed) + c.failed.load(Ordering::Relaxed);
                let total = if args.duration.is_some() {
                    String::new()
                } else {
                    format!("/{}", args.count)
                };
                eprint!(
                    "\r  sent {done}{total}  ({:.0} msg/s)   ",
                    done as f64 / start.elapsed().as_secs_f64()
                );
                let _ = std::io::stderr().flush();
            }
        })
    };
    let mut errors = Vec::new();
    for t in tasks {
        if let Ok(Err(e)) = t.await {
            errors.push(e.to_string());
        }
    }
    progress.abort();
    eprintln!();
    let secs = start.elapsed().as_secs_f64();
    let ok = c.ok.load(Ordering::Relaxed);
    let failed = c.failed.load(Ordering::Relaxed);
    let mut lat = c.latencies.lock().unwrap().clone();
    lat.sort_unstable();
    println!(
        "accepted {ok} messages in {secs:.2} s: {:.0} msg/s; {failed} refused; {} session errors",
        ok as f64 / secs,
        errors.len()
    );
    println!(
        "acceptance latency ms: p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1}",
        percentile(&lat, 0.5),
        percentile(&lat, 0.9),
        percentile(&lat, 0.99),
        percentile(&lat, 1.0)
    );
    if let Some(e) = errors.first() {
        eprintln!("first session error: {e}");
    }
    if args.json {
        println!(
            "{}",
            serde_json::json!({"accepted": ok, "recipients": c.rcpts_ok.load(Ordering::Relaxed), "refused": failed, "seconds": secs, "rate": ok as f64 / secs,
                "p50_ms": percentile(&lat, 0.5), "p99_ms": percentile(&lat, 0.99), "errors": errors.len()})
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct TestCli {
        #[command(flatten)]
        args: GenArgs,
    }

    fn args(extra: &[&str]) -> GenArgs {
        TestCli::parse_from(["gen"].iter().chain(extra)).args
    }

    #[test]
    fn one_recipient_by_default_and_many_spread_over_subdomains() {
        let a = args(&["--domain", "bench.test"]);
        let mix = Mix::parse(&a.domains).unwrap();
        assert_eq!(recipients(&a, &mix, 1007), ["user7@bench.test"]);

        let a = args(&["--domain", "bench.test", "--rcpts", "50", "--spread", "3"]);
        let r = recipients(&a, &mix, 2);
        assert_eq!(r.len(), 50);
        let distinct: std::collections::HashSet<_> = r.iter().collect();
        assert_eq!(
            distinct.len(),
            50,
            "each recipient of a message is distinct"
        );
        for (i, to) in r.iter().enumerate() {
            let (local, domain) = to.split_once('@').unwrap();
            assert_eq!(local, format!("user2-{i}"));
            assert!(
                ["d0.bench.test", "d1.bench.test", "d2.bench.test"].contains(&domain),
                "{to}"
            );
        }
        for bad in [["--rcpts", "0"], ["--rcpts", "1001"], ["--spread", "0"]] {
            assert!(
                TestCli::try_parse_from(["gen"].iter().chain(&bad)).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_base64_body_is_lines_of_random_base64_of_the_size_asked() {
        let a = args(&["--size", "20000", "--base64-body"]);
        let b = body(&a, 1, "user1@example.test", "<x@example.com>");
        let (head, text) = b.split_once("\r\n\r\n").unwrap();
        assert!(head.contains("Subject: sluice gen 1"));
        assert!(b.len() >= 20000 && b.len() < 20000 + 80, "{}", b.len());
        let lines: Vec<&str> = text.trim_end_matches("\r\n").split("\r\n").collect();
        use base64::Engine;
        let engine = base64::engine::general_purpose::STANDARD;
        for l in &lines {
            assert_eq!(l.len(), 76);
            assert!(engine.decode(l).is_ok(), "{l}");
        }
        let distinct: std::collections::HashSet<_> = lines.iter().collect();
        assert_eq!(distinct.len(), lines.len(), "no line repeats");
        let text_body = body(
            &args(&["--size", "20000"]),
            1,
            "u@example.test",
            "<x@example.com>",
        );
        assert!(text_body.contains("The quick brown fox"));
    }
}
