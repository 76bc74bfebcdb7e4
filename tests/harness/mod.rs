//! Shared test harness: free ports, a temporary folder per test, and processes that are killed
//! when the test ends, also when it fails. Everything runs on loopback.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_sluice");

/// A port that is free on 127.0.0.1 (TCP and UDP). Taken from below the kernel's ephemeral
/// range (32768 and up), so that no outgoing connection of a busy test can hold it by the
/// time a process binds it, and never the same one twice in this test process.
pub fn free_port() -> u16 {
    free_ports(1)
}

/// The first of `n` consecutive free ports, handed out as `free_port` hands out one.
pub fn free_ports(n: u32) -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 20000;
    const SPAN: u32 = 12000;
    // Each test binary (the integration one, the crates' unit tests) starts at its own place in
    // the range; within a binary, NEXT keeps concurrent tests apart.
    let offset = std::process::id().wrapping_mul(997) % SPAN;
    let free = |port: u16| {
        TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
    };
    for _ in 0..SPAN {
        let first = (offset + NEXT.fetch_add(n, Ordering::Relaxed)) % SPAN;
        if first + n > SPAN {
            continue;
        }
        let first = (LOW + first) as u16;
        if (0..n as u16).all(|i| free(first + i)) {
            return first;
        }
    }
    panic!("no {n} free ports between {LOW} and {}", LOW + SPAN);
}

/// The most timestamps (ms) that fall in any one window of `window_ms`.
pub fn max_in_window(ts: &[u64], window_ms: u64) -> usize {
    let mut v = ts.to_vec();
    v.sort_unstable();
    let mut best = 0;
    let mut start = 0;
    for end in 0..v.len() {
        while v[end] - v[start] >= window_ms {
            start += 1;
        }
        best = best.max(end - start + 1);
    }
    best
}

pub fn wait_for_port(addr: SocketAddr, timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Whether a DNS server on 127.0.0.1:`port` answers a query (any answer will do).
pub fn dns_answers(port: u16) -> bool {
    let Ok(sock) = std::net::UdpSocket::bind("127.0.0.1:0") else {
        return false;
    };
    let _ = sock.set_read_timeout(Some(Duration::from_millis(200)));
    // A query for probe.test, type A, class IN.
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in ["probe", "test"] {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    if sock.send_to(&q, ("127.0.0.1", port)).is_err() {
        return false;
    }
    let mut buf = [0u8; 512];
    matches!(sock.recv_from(&mut buf), Ok((n, _)) if n >= 12 && buf[..2] == [0x12, 0x34])
}

pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    f()
}

/// A child process killed (SIGKILL) when dropped.
pub struct Proc {
    pub name: String,
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            if Instant::now() > end {
                let _ = c.kill();
                return c.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            unsafe { libc::kill(c.id() as i32, libc::SIGCONT) };
        }
        self.kill9();
    }
}

/// Starts `sluice ARGS` with its output in `dir/name.log`.
pub fn spawn(dir: &Path, name: &str, args: &[&str]) -> Proc {
    spawn_env(dir, name, args, &[])
}

/// As `spawn`, with extra environment variables.
pub fn spawn_env(dir: &Path, name: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
    use std::os::unix::process::CommandExt;
    let log = dir.join(format!("{name}.log"));
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .unwrap();
    let err = out.try_clone().unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .env("RUST_LOG", "info,openraft=warn")
        // A zone far from UTC: accounting times must not follow the host's zone.
        .env("TZ", "Pacific/Chatham")
        .envs(env.iter().copied());
    // The child dies with the test process, even if the test is killed.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("starting {name}: {e}"));
    Proc {
        name: name.to_string(),
        child: Some(child),
        log,
    }
}

/// Runs `sluice ARGS` to completion, in plaintext: (success, stdout, stderr).
pub fn run(args: &[&str]) -> (bool, String, String) {
    run_env(args, &[("SLUICE_TLS_DIR", "")])
}

/// As `run`, with extra environment variables.
pub fn run_env(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("running sluice");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Runs a third-party tool; it must be installed (tests/run.sh installs them from Debian).
pub fn tool(program: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} is needed (tests/run.sh installs it): {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Issues a certificate for `role`/`name` in a CA folder made by `sluice cert init`.
pub fn issue_cert(dir: &Path, role: &str, name: &str, sans: &[&str]) {
    let mut args = vec![
        "cert",
        "issue",
        "--dir",
        dir.to_str().unwrap(),
        "--role",
        role,
        "--name",
        name,
    ];
    for s in sans {
        args.extend_from_slice(&["--san", s]);
    }
    let (ok, _, err) = run(&args);
    assert!(ok, "cert issue {role} {name}: {err}");
}

/// The processes of one test, in one temporary folder.
/// Fields drop in order: the processes are killed before their folders are removed.
pub struct Cluster {
    pub controllers: Vec<Proc>,
    pub others: Vec<Proc>,
    pub addrs: Vec<String>,
    pub extra: String,
    /// Settings lines for one controller only (by index), after `extra`.
    pub node_extra: Vec<String>,
    /// Filesystems mounted inside the folder: unmounted after the processes die.
    pub mounts: Vec<Tmpfs>,
    pub dir: tempfile::TempDir,
    /// Other folders the cluster's files point into (certificates), removed with it.
    pub kept: Vec<tempfile::TempDir>,
    /// The cluster's CA and certificates (`sluice cert`): every node talks mutual TLS.
    pub tls: PathBuf,
}

impl Cluster {
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Starts `n` controllers with `policy` and forms the cluster.
    pub fn start(n: usize, policy: &str, extra_settings: &str) -> Cluster {
        Cluster::start_with(n, policy, extra_settings, |_| Vec::new())
    }

    /// As `start`, with `prepare` called on the cluster's folder before any controller starts
    /// and after its certificates exist (to mount a small filesystem on a controller's data
    /// folder, say, or hand the files to another user).
    pub fn start_with(
        n: usize,
        policy: &str,
        extra_settings: &str,
        prepare: impl FnOnce(&Path) -> Vec<Tmpfs>,
    ) -> Cluster {
        Cluster::start_nodes(n, policy, extra_settings, &[], prepare)
    }

    /// As `start_with`, with settings lines for each controller of its own (`node_extra[i]`).
    pub fn start_nodes(
        n: usize,
        policy: &str,
        extra_settings: &str,
        node_extra: &[String],
        prepare: impl FnOnce(&Path) -> Vec<Tmpfs>,
    ) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let tls = dir.path().join("tls");
        let (ok, _, err) = run(&["cert", "init", "--dir", tls.to_str().unwrap()]);
        assert!(ok, "cert init: {err}");
        for i in 1..=n {
            issue_cert(&tls, "controller", &i.to_string(), &["127.0.0.1"]);
        }
        issue_cert(&tls, "ingress", "ingress", &[]);
        issue_cert(&tls, "operator", "admin", &[]);
        issue_cert(&tls, "viewer", "viewer", &[]);
        let mounts = prepare(dir.path());
        // Tests run as root on CI; the privilege-drop test sets process-user itself. Tests
        // that are not about delivery status notifications send none, so that the receivers
        // see only the mail the test sent (tests/dsn.rs sets `postmaster` and gets them).
        let dsn = if policy.contains("deliver-local-dsn") || policy.contains("postmaster") {
            ""
        } else {
            "deliver-local-dsn no\n"
        };
        std::fs::write(
            dir.path().join("policy.conf"),
            format!("run-as-root yes\n{dsn}{policy}"),
        )
        .unwrap();
        let addrs: Vec<String> = (0..n)
            .map(|_| format!("127.0.0.1:{}", free_port()))
            .collect();
        let mut c = Cluster {
            dir,
            controllers: Vec::new(),
            addrs: addrs.clone(),
            others: Vec::new(),
            extra: extra_settings.to_string(),
            node_extra: node_extra.to_vec(),
            mounts,
            kept: Vec::new(),
            tls,
        };
        for i in 0..n {
            c.start_controller(i);
        }
        for (i, a) in addrs.iter().enumerate() {
            assert!(
                wait_for_port(a.parse().unwrap(), Duration::from_secs(30)),
                "controller {a} did not listen:\n{}",
                tail(&c.controllers[i].log_text(), 20)
            );
        }
        let members: Vec<String> = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| format!("{}={a}", i + 1))
            .collect();
        let mut args = vec!["cluster", "init", "-c", &addrs[0]];
        for m in &members {
            args.push("--member");
            args.push(m);
        }
        let (ok, _, err) = c.cli(&args);
        assert!(ok, "cluster init failed: {err}");
        assert!(
            wait_until(Duration::from_secs(20), || c.leader().is_some()),
            "no leader elected"
        );
        c
    }

    pub fn start_controller(&mut self, i: usize) {
        if !self
            .tls_files("controller", &(i + 1).to_string())
            .1
            .exists()
        {
            issue_cert(
                &self.tls,
                "controller",
                &(i + 1).to_string(),
                &["127.0.0.1"],
            );
        }
        let p = self.path().join(format!("controller-{}.toml", i + 1));
        std::fs::write(
            &p,
            format!(
                "node_id = {}\ndata_dir = \"{}\"\ngrpc_listen = \"{}\"\npolicy = \"{}\"\ncontrollers = {:?}\n{}{}{}",
                i + 1,
                self.path().join(format!("controller-{}", i + 1)).display(),
                self.addrs[i],
                self.path().join("policy.conf").display(),
                self.addrs,
                self.tls_settings("controller", &(i + 1).to_string()),
                self.extra,
                self.node_extra.get(i).map_or("", String::as_str),
            ),
        )
        .unwrap();
        let proc = spawn(
            self.path(),
            &format!("controller-{}", i + 1),
            &["controller", "--settings", p.to_str().unwrap()],
        );
        if self.controllers.len() > i {
            self.controllers[i] = proc;
        } else {
            self.controllers.push(proc);
        }
    }

    /// Runs `sluice ARGS` as the cluster's operator (over mutual TLS).
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        self.cli_as("admin", args)
    }

    /// As `cli`, with another certificate from the cluster's folder (`viewer`, say).
    pub fn cli_as(&self, name: &str, args: &[&str]) -> (bool, String, String) {
        run_env(
            args,
            &[
                ("SLUICE_TLS_DIR", self.tls.to_str().unwrap()),
                ("SLUICE_TLS_NAME", name),
            ],
        )
    }

    /// The certificate files of one node, as an inline `tls` table of its settings (put before
    /// any `[section]`).
    pub fn tls_settings(&self, role: &str, name: &str) -> String {
        let (ca, cert, key) = self.tls_files(role, name);
        format!(
            "tls = {{ ca = \"{}\", cert = \"{}\", key = \"{}\" }}\n",
            ca.display(),
            cert.display(),
            key.display()
        )
    }

    /// (ca, cert, key) of one certificate in the cluster's folder.
    pub fn tls_files(&self, role: &str, name: &str) -> (PathBuf, PathBuf, PathBuf) {
        (
            self.tls.join("ca.pem"),
            self.tls.join(format!("{role}-{name}.pem")),
            self.tls.join(format!("{role}-{name}.key")),
        )
    }

    /// The ingress certificate, for tests that call the queue API themselves.
    pub fn ingress_tls(&self) -> sluice_proto::tls::TlsFiles {
        let (ca, cert, key) = self.tls_files("ingress", "ingress");
        sluice_proto::tls::TlsFiles { ca, cert, key }
    }

    /// The leader's index, as any reachable node sees it.
    pub fn leader(&self) -> Option<usize> {
        for a in &self.addrs {
            let (ok, out, _) = self.cli(&["cluster", "status", "-c", a, "--json"]);
            if ok {
                let v: serde_json::Value = serde_json::from_str(&out).ok()?;
                let id = v["leader_id"].as_u64()?;
                if id > 0 {
                    return Some(id as usize - 1);
                }
            }
        }
        None
    }

    fn settings_toml(&self, tls: &str, extra: &str) -> PathBuf {
        let p = self.path().join(format!("node-{}.toml", free_port()));
        std::fs::write(
            &p,
            format!(
                "controllers = {:?}\ndata_dir = \"{}\"\n{tls}{extra}",
                self.addrs,
                self.path().join("node").display()
            ),
        )
        .unwrap();
        p
    }

    /// Starts an ingress whose listeners come from the policy (`smtp-listener`,
    /// `http-mgmt-port`); the caller waits for its ports.
    pub fn start_ingress_from_policy(&mut self) {
        let s = self.settings_toml(&self.tls_settings("ingress", "ingress"), "");
        let p = spawn(
            self.path(),
            &format!("ingress-policy-{}", free_port()),
            &["ingress", "--settings", s.to_str().unwrap()],
        );
        self.others.push(p);
    }

    /// Starts an ingress with an extra implicit-TLS (SMTPS) listener; returns (smtp, smtps).
    pub fn start_ingress_smtps(&mut self) -> (SocketAddr, SocketAddr) {
        let smtp: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let smtps: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        self.spawn_ingress(smtp, smtps, &format!("smtps_listen = [\"{smtps}\"]\n"))
    }

    /// Starts an ingress with SMTP and HTTP on free ports; returns (smtp, http).
    pub fn start_ingress(&mut self) -> (SocketAddr, SocketAddr) {
        self.start_ingress_with("")
    }

    /// As `start_ingress`, with more lines for the `[ingress]` settings.
    pub fn start_ingress_with(&mut self, extra: &str) -> (SocketAddr, SocketAddr) {
        let smtp: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        self.start_ingress_at(smtp, extra)
    }

    /// As `start_ingress_with`, with SMTP on `smtp` (`[::1]:PORT`, say).
    pub fn start_ingress_at(&mut self, smtp: SocketAddr, extra: &str) -> (SocketAddr, SocketAddr) {
        let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        self.spawn_ingress(smtp, http, &format!("http_listen = \"{http}\"\n{extra}"))
    }

    /// Starts an ingress with SMTP on `smtp` and `ingress` settings lines that open `other`;
    /// waits for both ports.
    fn spawn_ingress(
        &mut self,
        smtp: SocketAddr,
        other: SocketAddr,
        ingress: &str,
    ) -> (SocketAddr, SocketAddr) {
        let s = self.settings_toml(
            &self.tls_settings("ingress", "ingress"),
            &format!("[ingress]\nsmtp_listen = [\"{smtp}\"]\n{ingress}"),
        );
        let p = spawn(
            self.path(),
            &format!("ingress-{}", smtp.port()),
            &["ingress", "--settings", s.to_str().unwrap()],
        );
        self.others.push(p);
        assert!(
            wait_for_port(smtp, Duration::from_secs(30))
                && wait_for_port(other, Duration::from_secs(30)),
            "ingress did not listen"
        );
        (smtp, other)
    }

    pub fn start_worker(&mut self, name: &str, ips: &[&str], extra: &str) -> usize {
        self.start_worker_env(name, ips, extra, &[])
    }

    pub fn start_worker_env(
        &mut self,
        name: &str,
        ips: &[&str],
        extra: &str,
        env: &[(&str, &str)],
    ) -> usize {
        issue_cert(&self.tls, "worker", name, ips);
        let s = self.settings_toml(
            &self.tls_settings("worker", name),
            &format!("[worker]\nname = \"{name}\"\nsource_ips = {ips:?}\n{extra}"),
        );
        let p = spawn_env(
            self.path(),
            name,
            &["worker", "--settings", s.to_str().unwrap()],
            env,
        );
        self.others.push(p);
        self.others.len() - 1
    }

    /// Starts a sink on `ip:port`; returns (address, stats file, folder of saved messages).
    pub fn start_sink_at(
        &mut self,
        addr: SocketAddr,
        extra: &[&str],
    ) -> (SocketAddr, PathBuf, PathBuf) {
        let stats = self
            .path()
            .join(format!("sink-{}-{}.json", addr.ip(), addr.port()));
        let saved = self
            .path()
            .join(format!("sink-{}-{}", addr.ip(), addr.port()));
        let listen = addr.to_string();
        let mut args = vec![
            "sink",
            "--listen",
            &listen,
            "--stats",
            stats.to_str().unwrap(),
            "--save-dir",
            saved.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let p = spawn(
            self.path(),
            &format!("sink-{}-{}", addr.ip(), addr.port()),
            &args,
        );
        self.others.push(p);
        assert!(
            wait_for_port(addr, Duration::from_secs(10)),
            "sink did not listen"
        );
        (addr, stats, saved)
    }

    pub fn start_sink(&mut self, extra: &[&str]) -> (SocketAddr, PathBuf, PathBuf) {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        self.start_sink_at(addr, extra)
    }

    /// Every message on node `i`'s replica.
    pub fn list(&self, i: usize) -> Option<serde_json::Value> {
        let (ok, out, _) = self.cli(&["debug", "list", "-c", &self.addrs[i]]);
        if ok {
            serde_json::from_str(&out).ok()
        } else {
            None
        }
    }

    /// Node `i`'s state digest and applied index.
    pub fn digest(&self, i: usize) -> Option<(String, u64)> {
        let (ok, out, _) = self.cli(&["debug", "digest", "-c", &self.addrs[i]]);
        if !ok {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        Some((v["digest"].as_str()?.to_string(), v["applied"].as_u64()?))
    }

    pub fn queues(&self) -> serde_json::Value {
        let (_, out, _) = self.cli(&["show", "queues", "--json", "-c", &self.addrs[0]]);
        serde_json::from_str(&out).unwrap_or(serde_json::json!([]))
    }

    /// Prints every process's log tail (for a failing test).
    pub fn dump_logs(&self) {
        for p in self.controllers.iter().chain(self.others.iter()) {
            eprintln!("===== {} =====\n{}", p.name, tail(&p.log_text(), 40));
        }
    }
}

/// A tmpfs of a given size mounted by the test itself, lazily unmounted when dropped (also
/// when the test fails). Needs root; `None` when mounting is not allowed here.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(at: &Path, size_mb: u64) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mb}m"), "tmpfs"])
            .arg(at)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then(|| Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub fn sink_stats(path: &Path) -> serde_json::Value {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(serde_json::json!({}))
}

/// A multi-threaded runtime for tests that drive many connections or gRPC calls at once.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A connection to `addr` from a chosen loopback address, so that `<source>` rules and
/// per-address limits see different clients.
pub async fn connect_from_async(
    from: std::net::IpAddr,
    addr: SocketAddr,
) -> std::io::Result<tokio::net::TcpStream> {
    let sock = if from.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.bind(SocketAddr::new(from, 0))?;
    sock.connect(addr).await
}

/// `connect_from_async`, blocking.
pub fn connect_from(from: &str, addr: SocketAddr) -> TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    let from = from.parse().expect("a loopback address");
    let s = rt
        .block_on(connect_from_async(from, addr))
        .expect("connect")
        .into_std()
        .unwrap();
    s.set_nonblocking(false).unwrap();
    s
}

/// A blocking SMTP client that reads whole replies.
pub struct SmtpClient {
    pub r: std::io::BufReader<TcpStream>,
    pub w: TcpStream,
}

impl SmtpClient {
    pub fn connect(addr: SocketAddr) -> SmtpClient {
        SmtpClient::on(TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect"))
    }

    pub fn connect_from(from: Option<&str>, addr: SocketAddr) -> SmtpClient {
        match from {
            None => SmtpClient::connect(addr),
            Some(ip) => SmtpClient::on(connect_from(ip, addr)),
        }
    }

    pub fn on(s: TcpStream) -> SmtpClient {
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        SmtpClient {
            r: std::io::BufReader::new(s.try_clone().unwrap()),
            w: s,
        }
    }

    /// Every line of the next reply, CRLF included ("" when the connection closed).
    pub fn reply_text(&mut self) -> String {
        use std::io::BufRead;
        let mut text = String::new();
        loop {
            let mut line = String::new();
            if self.r.read_line(&mut line).unwrap_or(0) == 0 {
                return text;
            }
            text.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                return text;
            }
        }
    }

    /// The last line of the next reply ("" when the connection closed).
    pub fn reply(&mut self) -> String {
        let text = self.reply_text();
        text.lines().last().unwrap_or("").to_string()
    }

    /// Sends one command line and reads its reply.
    pub fn send(&mut self, line: &str) -> String {
        use std::io::Write;
        if self.w.write_all(format!("{line}\r\n").as_bytes()).is_err() {
            return String::new();
        }
        self.reply()
    }

    pub fn raw(&mut self, bytes: &[u8]) {
        use std::io::Write;
        let _ = self.w.write_all(bytes);
    }
}

/// Sends one message over SMTP; returns the last reply line.
/// Sends one message from `ip` with raw envelope lines (parameters included), asserting that
/// MAIL, every RCPT and DATA are accepted; returns the reply to the end of data.
pub fn send_from(ip: &str, addr: SocketAddr, mail: &str, rcpts: &[&str], body: &str) -> String {
    let mut s = SmtpClient::connect_from(Some(ip), addr);
    s.reply();
    s.send("EHLO test.example.com");
    let m = s.send(&format!("MAIL FROM:{mail}"));
    assert!(m.starts_with("250"), "{mail}: {m}");
    for r in rcpts {
        let r2 = s.send(&format!("RCPT TO:{r}"));
        assert!(r2.starts_with("250"), "{r}: {r2}");
    }
    assert!(s.send("DATA").starts_with("354"));
    s.raw(format!("{}\r\n", body.replace('\n', "\r\n")).as_bytes());
    let fin = s.send(".");
    s.raw(b"QUIT\r\n");
    fin
}

pub fn smtp_send(addr: SocketAddr, from: &str, to: &[&str], body: &str) -> String {
    let mut s = SmtpClient::connect(addr);
    s.w.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.reply();
    s.send("EHLO test.example.com");
    let m = s.send(&format!("MAIL FROM:<{from}>"));
    if !m.starts_with('2') {
        return m;
    }
    for t in to {
        s.send(&format!("RCPT TO:<{t}>"));
    }
    let d = s.send("DATA");
    if !d.starts_with("354") {
        return d;
    }
    s.raw(format!("{}\r\n", body.replace('\n', "\r\n")).as_bytes());
    let fin = s.send(".");
    s.raw(b"QUIT\r\n");
    fin
}

/// Scrapes `urls` with tests/metrics_scrape.py: {url: [{name, labels, value}]}.
pub fn scrape_metrics(urls: &[String]) -> Result<serde_json::Value, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/metrics_scrape.py");
    let mut args = vec![script.to_str().unwrap()];
    args.extend(urls.iter().map(String::as_str));
    let (ok, out, err) = tool("/usr/bin/python3", &args);
    if !ok {
        return Err(err);
    }
    serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))
}

/// The sum of the samples called `name` whose labels include `labels`.
pub fn metric_value(samples: &serde_json::Value, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["name"] == name)
        .filter(|s| labels.iter().all(|(k, v)| s["labels"][*k] == *v))
        .map(|s| s["value"].as_f64().unwrap_or(0.0))
        .sum()
}
