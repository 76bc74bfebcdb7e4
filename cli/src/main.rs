//! `sluice`: starts each role of the cluster and operates it.

#[macro_use]
mod admin;
mod cert;
mod config_check;
mod dkim_keys;
mod show;
mod sink;
mod suppress;
mod traffic;
mod up;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;
use sluice_common::logging::{self, LogFormat};
use sluice_common::settings::Settings;

#[derive(Parser)]
#[command(name = "sluice", version, about = "Sluice: a clustered, PowerMTA-compatible outbound MTA.", long_about = None)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value = "human")]
    log_format: LogFormatArg,
    /// For commands that talk to controllers: a folder holding the cluster CA (`ca.pem`) and
    /// an operator or viewer certificate, as `sluice cert` writes them. Default: ./data/tls
    /// when it holds ca.pem (where `sluice up` puts them); empty for plaintext. The
    /// environment variable SLUICE_TLS_DIR stands in when the flag is absent.
    #[arg(long, global = true)]
    tls_dir: Option<PathBuf>,
    /// Which certificate in --tls-dir: `operator-NAME.pem`, else `viewer-NAME.pem`.
    #[arg(long, global = true, env = "SLUICE_TLS_NAME", default_value = "admin")]
    tls_name: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormatArg {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Start a one-host cluster in the foreground: controllers, ingress, worker and a sink.
    Up(up::UpArgs),
    /// Run a controller: a Raft member that holds the queue, the policy and the budgets.
    Controller(NodeArgs),
    /// Run an ingress node: the SMTP server and HTTP injection.
    Ingress(NodeArgs),
    /// Run a worker: delivers leased mail from the source IPs it owns.
    Worker(WorkerArgs),
    /// Manage controller membership and see the Raft group's health.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Check a policy file (PowerMTA syntax).
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Make the cluster CA and the certificates nodes and operators use for mutual TLS.
    #[command(subcommand)]
    Cert(CertCmd),
    /// Show what the cluster is doing.
    #[command(subcommand)]
    Show(ShowCmd),
    /// Run a smart SMTP sink on loopback for tests, demos and benchmarks.
    Sink(sink::SinkArgs),
    /// Generate SMTP or HTTP traffic and print throughput and latency.
    Gen(traffic::GenArgs),
    /// Pause delivery for queues matching DOMAIN/VMTA (`*` wildcards allowed).
    Pause(QueueArg),
    /// Resume delivery for queues matching DOMAIN/VMTA.
    Resume(QueueArg),
    /// Make matching queues' messages due now.
    Retry(QueueArg),
    /// Delete queued recipients by queue, recipient or job (each gets a `b` accounting row).
    Delete(DeleteArgs),
    /// Print accounting rows as CSV from one controller's replica; `--follow` keeps
    /// streaming new rows as they are applied.
    Acct(AcctArgs),
    /// Inspect one controller's replica (for tests and debugging).
    #[command(subcommand)]
    Debug(DebugCmd),
    /// Re-read the policy file on the controller; a broken file is rejected and the running
    /// policy stays.
    Reload(ControllerAddr),
    /// Change a queue: `set queue DOMAIN/VMTA --mode backoff|normal`.
    #[command(subcommand)]
    Set(SetCmd),
    /// Take a source IP out of use: `disable source IP [--for 2h]`.
    #[command(subcommand)]
    Disable(SourceCmd),
    /// Put a source IP back in use: `enable source IP`.
    #[command(subcommand)]
    Enable(SourceCmd),
    /// The replicated suppression list: `suppress add|remove|list|import|export`.
    #[command(subcommand)]
    Suppress(suppress::SuppressCmd),
    /// Follow a message or a recipient through the cluster: its accounting rows (every
    /// attempt with its reply) and its present state.
    Trace(TraceArgs),
    /// One queued message: envelope, recipients and their state, headers.
    Inspect(InspectArgs),
    /// How the policy handles a recipient: the source rule, relaying, the VMTA or pool, the
    /// queue, the domain rules and every effective setting, each with its FILE:LINE.
    Explain(crate::show::ExplainArgs),
}

#[derive(Subcommand)]
pub enum SetCmd {
    Queue {
        /// DOMAIN/VMTA; `*` wildcards match several queues.
        pattern: String,
        #[arg(long, value_parser = ["backoff", "normal"])]
        mode: String,
        /// How long backoff lasts (30m, 2h); default: the queue's backoff-to-normal-after.
        #[arg(long = "for")]
        for_: Option<String>,
        #[command(flatten)]
        at: ControllerAddr,
    },
}

#[derive(Subcommand)]
pub enum SourceCmd {
    Source {
        ip: String,
        /// (disable) back in use by itself after this long (30m, 2h); default: until enabled.
        #[arg(long = "for")]
        for_: Option<String>,
        #[command(flatten)]
        at: ControllerAddr,
    },
}

#[derive(Args)]
pub struct TraceArgs {
    /// The message id (hex, as in `250 2.0.0 OK queued as ...`).
    pub message: Option<String>,
    /// Only this recipient (or, without a message id, every message to it).
    #[arg(long)]
    pub rcpt: Option<String>,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub at: ControllerAddr,
}

#[derive(Args)]
pub struct InspectArgs {
    /// The message id (hex).
    pub message: String,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub at: ControllerAddr,
}

/// Settings shared by every role; flags override the settings file and SLUICE_* variables.
#[derive(Args, Clone, Default)]
struct NodeArgs {
    /// Node settings file (TOML). See docs/settings.md for every key.
    #[arg(long)]
    settings: Option<PathBuf>,
    /// Raft node id (controllers).
    #[arg(long)]
    node_id: Option<u64>,
    /// Folder for this node's state.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// gRPC listen address (controllers).
    #[arg(long)]
    grpc_listen: Option<SocketAddr>,
    /// Address other nodes use to reach this controller.
    #[arg(long)]
    advertise_addr: Option<String>,
    /// Policy file (controllers).
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Controller addresses to contact (ingress, workers), comma separated.
    #[arg(long, value_delimiter = ',')]
    controllers: Option<Vec<String>>,
}

#[derive(Args, Clone, Default)]
struct WorkerArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// Source IPs this worker owns, comma separated (each must be an address of this host).
    #[arg(long, value_delimiter = ',')]
    source_ips: Option<Vec<std::net::IpAddr>>,
    /// DNS servers for MX lookups (IP:PORT), comma separated.
    #[arg(long, value_delimiter = ',')]
    dns: Option<Vec<SocketAddr>>,
}

#[derive(Serialize, Default)]
struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    node_id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    grpc_listen: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    advertise_addr: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    policy: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    controllers: Option<Vec<String>>,
}

impl NodeArgs {
    fn load(&self) -> Result<Settings, String> {
        let o = Overrides {
            node_id: self.node_id,
            data_dir: self.data_dir.clone(),
            grpc_listen: self.grpc_listen,
            advertise_addr: self.advertise_addr.clone(),
            policy: self.policy.clone(),
            controllers: self.controllers.clone(),
        };
        Settings::load(self.settings.as_deref(), o)
    }
}

#[derive(Args, Clone)]
pub struct ControllerAddr {
    /// Any controller's gRPC address; followers point at the leader.
    #[arg(
        long,
        short = 'c',
        env = "SLUICE_CONTROLLER",
        default_value = "127.0.0.1:7400"
    )]
    pub controller: String,
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Make the first controller a one-node cluster, or form a cluster from `--member ID=ADDR`.
    Init {
        #[command(flatten)]
        at: ControllerAddr,
        /// Initial members as ID=ADDR (repeat); none means the contacted node alone.
        #[arg(long = "member")]
        members: Vec<String>,
    },
    /// Add a controller: it joins as a learner and becomes a voter once caught up.
    Add {
        node_id: u64,
        addr: String,
        #[command(flatten)]
        at: ControllerAddr,
    },
    /// Remove a controller from the voters.
    Remove {
        node_id: u64,
        #[command(flatten)]
        at: ControllerAddr,
    },
    /// Leader, term, commit and applied index, and each node's lag.
    Status {
        #[command(flatten)]
        at: ControllerAddr,
        #[arg(long)]
        json: bool,
        /// Only check the named controller (a readiness probe): exit 0 when it knows a leader
        /// and has applied the log to within --max-lag entries of the leader's commit index.
        #[arg(long)]
        ready: bool,
        #[arg(long, default_value_t = 1000, requires = "ready")]
        max_lag: u64,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Parse and validate a policy file and its includes, and warn about classic mistakes
    /// (open relay, retry-after past bounce-after, backoff nothing triggers, ...), each as
    /// FILE:LINE: message with a fix. Exit 0 with a summary, or 1 with every error.
    Check {
        file: PathBuf,
        /// A worker's settings file (repeatable): warn about VMTAs whose source IP none of
        /// them owns.
        #[arg(long = "worker-settings")]
        worker_settings: Vec<PathBuf>,
        /// Print the resolved model as JSON.
        #[arg(long)]
        json: bool,
        /// Do not read files the policy names (DKIM keys, certificates), for checking a
        /// config copied from another host.
        #[arg(long)]
        skip_files: bool,
    },
    /// Read a password on standard input and print its argon2 hash, for `password-hash` in
    /// `<smtp-user>` (so the policy file need not hold the password).
    HashPassword,
    /// Generate the DKIM key files a policy names that do not exist yet (RSA 2048, mode
    /// 0600), each with FILE.txt holding the DNS record to publish. `sluice up` does this.
    DkimKeys { file: PathBuf },
}

#[derive(Subcommand)]
enum CertCmd {
    /// Create a cluster CA (`ca.pem`, `ca.key`) in a folder.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
        /// Replace an existing CA (every certificate it issued stops working).
        #[arg(long)]
        force: bool,
    },
    /// Issue a key and certificate signed by the CA in --dir, written as ROLE-NAME.pem and
    /// ROLE-NAME.key (mode 0600) in --out (default: --dir).
    Issue {
        #[arg(long)]
        dir: PathBuf,
        /// controller, ingress, worker, operator or viewer.
        #[arg(long)]
        role: String,
        /// The node's name: a controller's node id, a worker's `worker.name`, an operator's.
        #[arg(long)]
        name: String,
        /// A host name or IP address the node is reached at (controllers), or a source IP the
        /// worker sends from (workers); repeat.
        #[arg(long = "san")]
        sans: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 825)]
        days: u32,
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ShowCmd {
    /// The leader's view: Raft state, policy version and queue totals.
    Status {
        #[command(flatten)]
        at: ControllerAddr,
        #[arg(long)]
        json: bool,
    },
    /// Every non-empty queue: mode, recipients, oldest age, connections and rate.
    Queues {
        #[command(flatten)]
        at: ControllerAddr,
        #[arg(long)]
        json: bool,
    },
    /// The destination domains with the most recipients queued.
    Topdomains {
        #[command(flatten)]
        at: ControllerAddr,
        #[arg(long)]
        json: bool,
        /// How many.
        #[arg(long, short = 'n', default_value_t = 10)]
        count: usize,
    },
    /// Every destination domain with mail queued (or a paused queue).
    Domains {
        #[command(flatten)]
        at: ControllerAddr,
        #[arg(long)]
        json: bool,
    },
    /// Every virtual MTA: source IP, state, queued recipients, connections, last hour.
    Vmtas {
        #[command(flatten)]
        at: ControllerAddr,
        #[arg(long)]
        json: bool,
    },
    /// Workers the leader has heard from: source IPs, capacity, leases, policy version.
    Workers {
        #[command(flatten)]
        at: ControllerAddr,
        #[arg(long)]
        json: bool,
    },
    /// Jobs (X-Job) with mail queued or traffic in the last hour.
    Jobs {
        #[command(flatten)]
        at: ControllerAddr,
        #[arg(long)]
        json: bool,
    },
    /// The resolved directives for a destination, each with the FILE:LINE it came from.
    Settings {
        domain: String,
        #[arg(long)]
        vmta: Option<String>,
        #[command(flatten)]
        at: ControllerAddr,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum DebugCmd {
    /// Every message on this node's replica, as JSON.
    List {
        #[command(flatten)]
        at: ControllerAddr,
    },
    /// A digest of this node's state machine and its applied index, as JSON.
    Digest {
        #[command(flatten)]
        at: ControllerAddr,
    },
    /// The policy version this controller runs (not the leader's).
    PolicyVersion {
        #[command(flatten)]
        at: ControllerAddr,
    },
    /// Move this controller's clock forward (`90s`, `2h`, `1d`), for tests of long retry
    /// schedules. Needs `scheduler.allow_clock_control` on that controller.
    AdvanceClock {
        by: String,
        #[command(flatten)]
        at: ControllerAddr,
    },
}

#[derive(Args)]
struct QueueArg {
    /// DOMAIN/VMTA, `*` wildcards allowed (`gmail.test/*`).
    pattern: String,
    #[command(flatten)]
    at: ControllerAddr,
}

#[derive(Args)]
pub struct AcctArgs {
    /// Start after this row number (the `seq` column; 0 = the oldest row still held).
    #[arg(long, default_value_t = 0)]
    pub after: u64,
    /// Columns, comma separated (default: the PowerMTA default columns).
    #[arg(long, value_delimiter = ',')]
    pub fields: Vec<String>,
    /// Record types, comma separated (`d,b,t,tq,r`; default: all).
    #[arg(long, value_delimiter = ',')]
    pub records: Vec<String>,
    /// Keep streaming new rows.
    #[arg(long)]
    pub follow: bool,
    #[command(flatten)]
    pub at: ControllerAddr,
}

#[derive(Args)]
struct DeleteArgs {
    #[arg(long)]
    queue: Option<String>,
    #[arg(long)]
    rcpt: Option<String>,
    #[arg(long)]
    job: Option<String>,
    #[command(flatten)]
    at: ControllerAddr,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Nothing Sluice writes is for other users: accounting files come out 0640, folders 0750
    // (data folders are made 0700, keys and certificates 0600, explicitly).
    unsafe { libc::umask(0o027) };
    let _ = rustls::crypto::ring::default_provider().install_default();
    logging::init(match cli.log_format {
        LogFormatArg::Human => LogFormat::Human,
        LogFormatArg::Json => LogFormat::Json,
    });
    if let Command::Config(ConfigCmd::Check {
        file,
        json,
        skip_files,
        worker_settings,
    }) = &cli.command
    {
        return config_check::run(file, *json, *skip_files, worker_settings);
    }
    if let Command::Config(ConfigCmd::HashPassword) = &cli.command {
        return config_check::hash_password();
    }
    if let Command::Config(ConfigCmd::DkimKeys { file }) = &cli.command {
        return match dkim_keys::make_missing(file) {
            Ok(made) if made.is_empty() => {
                println!("every DKIM key the policy names exists");
                ExitCode::SUCCESS
            }
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Command::Cert(c) = &cli.command {
        let res = match c {
            CertCmd::Init { dir, days, force } => cert::init(dir, *days, *force),
            CertCmd::Issue {
                dir,
                role,
                name,
                sans,
                days,
                out,
            } => cert::issue(dir, out.as_deref(), role, name, sans, *days).map(|(c, k)| {
                println!("{} (key {})", c.display(), k.display());
            }),
        };
        return match res {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if !matches!(
        cli.command,
        Command::Controller(_) | Command::Ingress(_) | Command::Worker(_) | Command::Up(_)
    ) && let Err(e) = operator_tls(
        cli.tls_dir
            .or_else(|| std::env::var_os("SLUICE_TLS_DIR").map(PathBuf::from))
            .as_deref(),
        &cli.tls_name,
    ) {
        eprintln!("error: {e:#}");
        return ExitCode::FAILURE;
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Controller(args) => {
            let settings = args.load().map_err(anyhow::Error::msg)?;
            // Bound first: the controller may give up root before it opens anything else.
            let listener = tokio::net::TcpListener::bind(settings.grpc_listen)
                .await
                .with_context(|| format!("listening on {}", settings.grpc_listen))?;
            let metrics = match settings.metrics.listen {
                Some(a) => Some(
                    tokio::net::TcpListener::bind(a)
                        .await
                        .with_context(|| format!("binding the metrics listener {a}"))?,
                ),
                None => None,
            };
            let ctl = sluice_controller::node::Controller::start(settings).await?;
            sluice_controller::server::serve(ctl, listener, metrics, shutdown_signal()).await
        }
        Command::Ingress(args) => {
            let settings = args.load().map_err(anyhow::Error::msg)?;
            sluice_ingress::run(settings, shutdown_signal()).await
        }
        Command::Worker(args) => {
            let mut settings = args.node.load().map_err(anyhow::Error::msg)?;
            if let Some(ips) = args.source_ips {
                settings.worker.source_ips = ips;
            }
            if let Some(d) = args.dns {
                settings.worker.dns_servers = d;
            }
            sluice_worker::run(settings, shutdown_signal()).await
        }
        Command::Sink(a) => sink::run(a).await,
        Command::Up(a) => up::run(a).await,
        Command::Gen(a) => traffic::run(a).await,
        Command::Cluster(c) => admin::cluster(c).await,
        Command::Show(s) => admin::show(s).await,
        Command::Pause(q) => admin::queue_op("pause", q).await,
        Command::Resume(q) => admin::queue_op("resume", q).await,
        Command::Retry(q) => admin::queue_op("retry", q).await,
        Command::Delete(d) => admin::delete(d).await,
        Command::Reload(at) => admin::reload(at).await,
        Command::Set(s) => show::set(s).await,
        Command::Disable(s) => show::source(s, false).await,
        Command::Enable(s) => show::source(s, true).await,
        Command::Suppress(s) => suppress::run(s).await,
        Command::Trace(t) => show::trace(t).await,
        Command::Inspect(i) => show::inspect(i).await,
        Command::Explain(e) => show::explain(e).await,
        Command::Debug(d) => admin::debug(d).await,
        Command::Acct(a) => admin::acct(a).await,
        Command::Config(_) | Command::Cert(_) => {
            unreachable!("handled before the runtime starts")
        }
    }
}

/// The certificate commands that talk to controllers present: from --tls-dir, or ./data/tls
/// when it holds a CA; plaintext otherwise.
fn operator_tls(dir: Option<&std::path::Path>, name: &str) -> anyhow::Result<()> {
    let (dir, explicit) = match dir {
        Some(d) if d.as_os_str().is_empty() => return Ok(()),
        Some(d) => (d.to_path_buf(), true),
        None => (PathBuf::from("data/tls"), false),
    };
    let ca = dir.join("ca.pem");
    if !ca.exists() {
        if explicit {
            anyhow::bail!("{} does not exist (see `sluice cert init`)", ca.display());
        }
        return Ok(());
    }
    let found = ["operator", "viewer"].iter().find_map(|role| {
        let (c, k) = cert::paths_in(&dir, role, name);
        c.exists().then_some((c, k))
    });
    let Some((cert, key)) = found else {
        anyhow::bail!(
            "{} holds no operator-{name}.pem or viewer-{name}.pem (see `sluice cert issue --role operator --name {name}`)",
            dir.display()
        );
    };
    sluice_proto::use_client_tls(Some(sluice_proto::tls::TlsFiles { ca, cert, key }));
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
