//! `sluice up`: a one-host cluster in the foreground. Controllers, an ingress, a worker and
//! (by default) the smart sink run as separate processes of this binary, supervised: one that
//! dies is started again after a backoff and the rest keep running. Ctrl-C stops them all, and
//! a restart with the same data folder finds the queue as it was.

use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use sluice_proto::admin::InitRequest;
use sluice_proto::admin::admin_client::AdminClient;

#[derive(Args, Clone)]
pub struct UpArgs {
    /// Folder for all state (queue, accounting, sink output).
    #[arg(long, default_value = "./data")]
    pub data_dir: PathBuf,
    /// Policy file (PowerMTA syntax).
    #[arg(long, default_value = "deploy/examples/sluice.conf")]
    pub policy: PathBuf,
    /// Number of controllers (1, 3 or 5).
    #[arg(long, default_value_t = 1)]
    pub controllers: u32,
    /// SMTP port of the ingress on 127.0.0.1.
    #[arg(long, default_value_t = 2525)]
    pub smtp_port: u16,
    /// HTTP injection port on 127.0.0.1.
    #[arg(long, default_value_t = 8025)]
    pub http_port: u16,
    /// First controller gRPC port on 127.0.0.1 (the others follow).
    #[arg(long, default_value_t = 7400)]
    pub grpc_port: u16,
    /// Port of the smart sink on 127.0.0.1 (the example policy routes *.test there).
    #[arg(long, default_value_t = 2526)]
    pub sink_port: u16,
    /// First port of the metrics (and monitor) HTTP servers on 127.0.0.1: controllers take
    /// it and the next ones, then the ingress, then the worker. 0 serves none.
    #[arg(long, default_value_t = 0)]
    pub metrics_port: u16,
    /// Do not start the smart sink.
    #[arg(long)]
    pub no_sink: bool,
    /// Do not start a worker (mail stays queued until one is started).
    #[arg(long)]
    pub no_worker: bool,
    /// Source IP of the worker.
    #[arg(long, default_value = "127.0.0.1")]
    pub source_ip: String,
    /// Lease time-to-live in milliseconds (how soon a dead worker's mail is retried).
    #[arg(long, default_value_t = 30_000)]
    pub lease_ttl_ms: u64,
    /// gRPC between the processes without TLS (allowed on loopback only; for measuring what
    /// mutual TLS costs).
    #[arg(long)]
    pub plaintext: bool,
}

/// The `[metrics]` section of the process at `offset` from `--metrics-port` (none at 0).
fn metrics_section(a: &UpArgs, offset: u16) -> String {
    if a.metrics_port == 0 {
        return String::new();
    }
    format!(
        "[metrics]\nlisten = \"127.0.0.1:{}\"\n",
        a.metrics_port.saturating_add(offset)
    )
}

/// The worker `sluice up` starts (its certificate carries this name).
const WORKER: &str = "sluice-worker";

/// The one-host cluster's CA and certificates, made once and kept with its data.
struct Certs {
    /// None: plaintext (`--plaintext`).
    dir: Option<PathBuf>,
}

impl Certs {
    fn make(dir: &Path, controllers: u32, source_ip: &str) -> anyhow::Result<Certs> {
        if !dir.join("ca.pem").exists() {
            crate::cert::init(dir, 3650, false)?;
        }
        let want = |role: &str, name: &str, sans: &[String]| -> anyhow::Result<()> {
            if !crate::cert::paths_in(dir, role, name).0.exists() {
                crate::cert::issue(dir, None, role, name, sans, 825)?;
            }
            Ok(())
        };
        let local = ["127.0.0.1".to_string(), "localhost".to_string()];
        for id in 1..=controllers {
            want("controller", &id.to_string(), &local)?;
        }
        want("ingress", "ingress", &[])?;
        want("worker", WORKER, &[source_ip.to_string()])?;
        want("operator", "admin", &[])?;
        let (cert, key) = crate::cert::paths_in(dir, "operator", "admin");
        sluice_proto::use_client_tls(Some(sluice_proto::tls::TlsFiles {
            ca: dir.join("ca.pem"),
            cert,
            key,
        }));
        Ok(Certs {
            dir: Some(dir.to_path_buf()),
        })
    }

    /// The `[tls]` settings of one node.
    fn section(&self, role: &str, name: &str) -> String {
        let Some(dir) = &self.dir else {
            return String::new();
        };
        let (cert, key) = crate::cert::paths_in(dir, role, name);
        format!(
            "[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            dir.join("ca.pem").display(),
            cert.display(),
            key.display()
        )
    }
}

/// A child process `sluice up` keeps running: when it dies it is started again after a
/// backoff (1 s, doubling to 30 s; back to 1 s once it has run for a minute).
struct Supervised {
    name: String,
    args: Vec<String>,
    log: PathBuf,
    child: Child,
    started: Instant,
    backoff: Duration,
    restart_at: Option<Instant>,
}

const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

impl Supervised {
    fn start(name: &str, args: Vec<String>, log: PathBuf) -> anyhow::Result<Supervised> {
        let child = spawn(name, &args, &log, false)?;
        Ok(Supervised {
            name: name.to_string(),
            args,
            log,
            child,
            started: Instant::now(),
            backoff: FIRST_BACKOFF,
            restart_at: None,
        })
    }

    /// Notices an exit and restarts when the backoff has passed.
    fn tend(&mut self) {
        if let Some(at) = self.restart_at {
            if Instant::now() < at {
                return;
            }
            match spawn(&self.name, &self.args, &self.log, true) {
                Ok(c) => {
                    eprintln!("{} restarted (pid {})", self.name, c.id());
                    self.child = c;
                    self.started = Instant::now();
                    self.restart_at = None;
                }
                Err(e) => {
                    eprintln!("{} could not be restarted: {e:#}", self.name);
                    self.restart_at = Some(Instant::now() + MAX_BACKOFF);
                }
            }
            return;
        }
        let Ok(Some(status)) = self.child.try_wait() else {
            return;
        };
        if self.started.elapsed() > Duration::from_secs(60) {
            self.backoff = FIRST_BACKOFF;
        }
        let wait = self.backoff;
        eprintln!(
            "{} exited ({status}); restarting it in {wait:?} (log: {})",
            self.name,
            self.log.display()
        );
        self.restart_at = Some(Instant::now() + wait);
        self.backoff = (wait * 2).min(MAX_BACKOFF);
    }
}

struct Children(Vec<Supervised>);

impl Children {
    fn start(&mut self, name: &str, args: Vec<String>, log: PathBuf) -> anyhow::Result<()> {
        self.0.push(Supervised::start(name, args, log)?);
        Ok(())
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for s in &self.0 {
            if s.restart_at.is_none() {
                unsafe { libc::kill(s.child.id() as i32, libc::SIGTERM) };
            }
        }
        for s in &mut self.0 {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match s.child.try_wait() {
                    Ok(Some(_)) => break,
                    _ if Instant::now() > deadline => {
                        eprintln!("{} did not stop; killing it", s.name);
                        let _ = s.child.kill();
                        let _ = s.child.wait();
                        break;
                    }
                    _ => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
    }
}

/// Starts one child; a restart appends to its log rather than replacing it.
fn spawn(name: &str, args: &[String], log: &Path, append: bool) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("finding the sluice binary")?;
    let out = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let err = out.try_clone()?;
    let mut cmd = Command::new(exe);
    cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
    // The children die with this process even if it is killed.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    cmd.spawn().with_context(|| format!("starting {name}"))
}

pub async fn run(a: UpArgs) -> anyhow::Result<()> {
    if ![1, 3, 5].contains(&a.controllers) {
        anyhow::bail!("--controllers must be 1, 3 or 5");
    }
    let policy = std::fs::canonicalize(&a.policy)
        .with_context(|| format!("the policy {} does not exist", a.policy.display()))?;
    crate::dkim_keys::make_missing(&policy)?;
    crate::config_check::load_or_report(&policy)?;
    std::fs::create_dir_all(&a.data_dir)?;
    let data = std::fs::canonicalize(&a.data_dir)?;
    let logs = data.join("logs");
    std::fs::create_dir_all(&logs)?;
    let tls = data.join("tls");
    let certs = if a.plaintext {
        sluice_proto::use_client_tls(None);
        Certs { dir: None }
    } else {
        Certs::make(&tls, a.controllers, &a.source_ip)?
    };
    let mut children = Children(Vec::new());
    let addrs: Vec<String> = (0..a.controllers)
        .map(|i| format!("127.0.0.1:{}", a.grpc_port + i as u16))
        .collect();
    if !a.no_sink {
        let dir = data.join("sink");
        std::fs::create_dir_all(&dir)?;
        let args = vec![
            "sink".into(),
            "--listen".into(),
            format!("127.0.0.1:{}", a.sink_port),
            "--tls".into(),
            "--save-dir".into(),
            dir.join("messages").display().to_string(),
            "--stats".into(),
            dir.join("stats.json").display().to_string(),
        ];
        children.start("sink", args, logs.join("sink.log"))?;
    }
    for (i, addr) in addrs.iter().enumerate() {
        let id = i + 1;
        let dir = data.join(format!("controller-{id}"));
        let settings = dir.with_extension("toml");
        std::fs::write(
            &settings,
            format!(
                "node_id = {id}\ndata_dir = \"{}\"\ngrpc_listen = \"{addr}\"\npolicy = \"{}\"\ncontrollers = {addrs:?}\n[scheduler]\nlease_ttl_ms = {}\n{}{}",
                dir.display(),
                policy.display(),
                a.lease_ttl_ms,
                certs.section("controller", &id.to_string()),
                metrics_section(&a, i as u16),
            ),
        )?;
        let args = vec![
            "controller".into(),
            "--settings".into(),
            settings.display().to_string(),
        ];
        children.start(
            &format!("controller-{id}"),
            args,
            logs.join(format!("controller-{id}.log")),
        )?;
    }
    // A fresh cluster is initialised once; a restart finds its membership on disk.
    let marker = data.join("cluster-initialised");
    if !marker.exists() {
        let members: HashMap<u64, String> = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| (i as u64 + 1, a.clone()))
            .collect();
        let mut tries = 0;
        loop {
            let res = async {
                let ch = sluice_proto::connect(&addrs[0]).await?;
                AdminClient::new(ch)
                    .init(InitRequest {
                        members: members.clone(),
                    })
                    .await?;
                anyhow::Ok(())
            }
            .await;
            match res {
                Ok(()) => break,
                Err(_) if tries < 100 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => anyhow::bail!("cannot initialise the cluster: {e}"),
            }
        }
        std::fs::write(&marker, "")?;
    }
    let ingress = data.join("ingress.toml");
    std::fs::write(
        &ingress,
        format!(
            "data_dir = \"{}\"\ncontrollers = {addrs:?}\n[ingress]\nsmtp_listen = [\"127.0.0.1:{}\"]\nhttp_listen = \"127.0.0.1:{}\"\n{}{}",
            data.join("ingress").display(),
            a.smtp_port,
            a.http_port,
            certs.section("ingress", "ingress"),
            metrics_section(&a, a.controllers as u16),
        ),
    )?;
    children.start(
        "ingress",
        vec![
            "ingress".into(),
            "--settings".into(),
            ingress.display().to_string(),
        ],
        logs.join("ingress.log"),
    )?;
    let worker = data.join("worker.toml");
    std::fs::write(
        &worker,
        format!(
            "data_dir = \"{}\"\ncontrollers = {addrs:?}\n[worker]\nname = \"{WORKER}\"\nsource_ips = [\"{}\"]\n{}{}",
            data.join("worker").display(),
            a.source_ip,
            certs.section("worker", WORKER),
            metrics_section(&a, a.controllers as u16 + 1),
        ),
    )?;
    if !a.no_worker {
        children.start(
            "worker",
            vec![
                "worker".into(),
                "--settings".into(),
                worker.display().to_string(),
            ],
            logs.join("worker.log"),
        )?;
    }

    println!(
        "Sluice is up ({} controller{}).",
        a.controllers,
        if a.controllers > 1 { "s" } else { "" }
    );
    println!("  SMTP         127.0.0.1:{}", a.smtp_port);
    println!(
        "  HTTP inject  http://127.0.0.1:{}/api/inject/v1",
        a.http_port
    );
    println!("  controllers  {}", addrs.join(", "));
    println!(
        "  accounting   {}",
        data.join("controller-1").join("acct.csv").display()
    );
    if !a.no_sink {
        println!(
            "  sink         127.0.0.1:{} (messages in {})",
            a.sink_port,
            data.join("sink/messages").display()
        );
    }
    if a.metrics_port != 0 {
        let n = a.controllers as u16;
        println!(
            "  metrics      http://127.0.0.1:{}/metrics (controllers from there, ingress :{}, worker :{})",
            a.metrics_port,
            a.metrics_port.saturating_add(n),
            a.metrics_port.saturating_add(n + 1)
        );
    }
    println!("  logs         {}", logs.display());
    println!(
        "Try:  swaks --server 127.0.0.1:{} --from you@example.com --to someone@gmail.test",
        a.smtp_port
    );
    let default_tls = std::fs::canonicalize("data/tls").ok() == Some(tls.clone());
    println!(
        "      sluice show queues -c {}{}",
        addrs[0],
        if a.plaintext {
            " --tls-dir ''".to_string()
        } else if default_tls {
            String::new()
        } else {
            format!(" --tls-dir {}", tls.display())
        }
    );
    if a.plaintext {
        println!("  gRPC         plaintext on loopback (--plaintext)");
    } else {
        println!("  mutual TLS   CA and certificates in {}", tls.display());
    }

    println!("A process that dies is started again; Ctrl-C stops everything.");
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let stop = crate::shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => children.0.iter_mut().for_each(Supervised::tend),
        }
    }
    drop(children);
    println!("stopped");
    Ok(())
}
