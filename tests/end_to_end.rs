//! The whole path as a user meets it: `sluice up` (controller, ingress, worker, sink as
//! processes), swaks injecting, DKIM checked with python3-dkim against a key served by a DNS
//! server on loopback, accounting rows, retries and expiry, and `sluice show queues`.

use crate::harness;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::harness::*;

struct Dns(std::process::Child);

impl Drop for Dns {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// dnsmasq on a free loopback port, serving the DKIM public key of `example.com`.
fn start_dns(dir: &Path, txt: &str) -> (Dns, u16) {
    let port = free_port();
    // TXT strings are at most 255 octets: split the key record (dnsmasq takes no quotes here).
    let chunks: Vec<String> = txt
        .as_bytes()
        .chunks(250)
        .map(|c| String::from_utf8_lossy(c).to_string())
        .collect();
    let child = Command::new("dnsmasq")
        .args([
            "--no-daemon",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            &format!("--port={port}"),
            &format!("--pid-file={}", dir.join("dnsmasq.pid").display()),
            &format!(
                "--txt-record=sluice._domainkey.example.com,{}",
                chunks.join(",")
            ),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("dnsmasq is needed (tests/run.sh installs dnsmasq-base)");
    assert!(
        wait_until(Duration::from_secs(10), || dns_answers(port)),
        "dnsmasq did not answer on port {port}"
    );
    (Dns(child), port)
}

fn acct_rows(path: &Path) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .skip(1)
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect()
}

#[test]
fn swaks_to_sluice_up_reaches_the_sink_signed_and_accounted() {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    // No key in the repository: `sluice up` makes the one the policy names on first run.
    let key = dir.path().join("dkim/example.com.sluice.pem");
    let (smtp, http, grpc, sink) = (free_port(), free_port(), free_port(), free_port());
    // One controller, the ingress and the worker serve metrics from here on.
    let metrics = free_ports(3);
    // Fast retries and expiry so that hours of schedule take seconds.
    let policy = format!(
        "host-name sluice.example.com\n\
         run-as-root yes\n\
         domain-key sluice,example.com,{key}\n\
         <source 127.0.0.1>\n  always-allow-relaying yes\n  smtp-service yes\n  process-x-job yes\n  default-virtual-mta pool-a\n</source>\n\
         <virtual-mta vmta-a>\n  smtp-source-host 127.0.0.1 mta-a.example.com\n</virtual-mta>\n\
         <virtual-mta-pool pool-a>\n  virtual-mta vmta-a\n</virtual-mta-pool>\n\
         <domain *>\n  route [127.0.0.1]:{sink}\n  retry-after 2s,3s\n  bounce-after 20s\n  dkim-sign yes\n  use-starttls yes\n</domain>\n\
         <acct-file acct.csv>\n  records r,d,b,t\n</acct-file>\n\
         <acct-file subjects.csv>\n  records d\n  record-fields d rcpt,header_Subject\n</acct-file>\n",
        key = key.display()
    );
    let policy_path = dir.path().join("policy.conf");
    std::fs::write(&policy_path, policy).unwrap();
    let data = dir.path().join("data");
    let mut up = spawn(
        dir.path(),
        "up",
        &[
            "up",
            "--data-dir",
            data.to_str().unwrap(),
            "--policy",
            policy_path.to_str().unwrap(),
            "--smtp-port",
            &smtp.to_string(),
            "--http-port",
            &http.to_string(),
            "--grpc-port",
            &grpc.to_string(),
            "--sink-port",
            &sink.to_string(),
            "--metrics-port",
            &metrics.to_string(),
        ],
    );
    let smtp_addr = format!("127.0.0.1:{smtp}");
    if !wait_for_port(smtp_addr.parse().unwrap(), Duration::from_secs(60)) {
        eprintln!("{}", up.log_text());
        for f in ["controller-1", "ingress", "worker", "sink"] {
            eprintln!(
                "== {f}\n{}",
                std::fs::read_to_string(data.join(format!("logs/{f}.log"))).unwrap_or_default()
            );
        }
        panic!("sluice up did not start");
    }
    let grpc_addr = format!("127.0.0.1:{grpc}");
    let txt = std::fs::read_to_string(dir.path().join("dkim/example.com.sluice.pem.txt"))
        .expect("sluice up writes the DKIM record beside the key it made");
    let key_mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        key_mode, 0o600,
        "the generated DKIM key is readable by others"
    );
    // The CLI talks mutual TLS with the certificates `sluice up` made.
    let tls_dir = data.join("tls");
    let run = |args: &[&str]| run_env(args, &[("SLUICE_TLS_DIR", tls_dir.to_str().unwrap())]);
    let (ok, _, err) = harness::run(&["show", "queues", "-c", &grpc_addr]);
    assert!(!ok, "a client without a certificate was served: {err}");
    let (ok, out, err) = tool(
        "swaks",
        &[
            "--server",
            &smtp_addr,
            "--from",
            "news@example.com",
            "--to",
            "alice@gmail.test,tempfail@gmail.test,permfail@gmail.test",
            "--header",
            "Subject: end to end",
            "--header",
            "X-Job: e2e-1",
        ],
    );
    assert!(
        ok && out.contains("250 2.0.0 OK queued as"),
        "swaks failed:\n{out}\n{err}"
    );

    let acct = data.join("controller-1/acct.csv");
    let messages = data.join("sink/messages");
    assert!(
        wait_until(Duration::from_secs(30), || acct_rows(&acct)
            .iter()
            .any(|r| r[0] == "d")),
        "no delivery row; acct:\n{}\nworker log:\n{}",
        std::fs::read_to_string(&acct).unwrap_or_default(),
        std::fs::read_to_string(data.join("logs/worker.log")).unwrap_or_default()
    );
    // The deferred recipient waits in its queue.
    let (_, q, _) = run(&["show", "queues", "--json", "-c", &grpc_addr]);
    let q: serde_json::Value = serde_json::from_str(&q).unwrap();
    assert_eq!(q[0]["queue"], "gmail.test", "{q}");
    assert_eq!(q[0]["recipients"], 1, "{q}");
    // OLDEST is the age of the oldest message waiting, not how overdue the queue is: it grows
    // while the recipient waits for a retry that is not due yet.
    let oldest = || {
        let (_, q, _) = run(&["show", "queues", "--json", "-c", &grpc_addr]);
        serde_json::from_str::<serde_json::Value>(&q).unwrap()[0]["oldest_age_s"]
            .as_u64()
            .unwrap_or(0)
    };
    assert!(
        wait_until(Duration::from_secs(10), || oldest() >= 3),
        "OLDEST stayed at {}",
        oldest()
    );
    // permfail@ bounced: its sender gets a delivery status notification (null reverse-path),
    // delivered through the same sink.
    let saved = || -> Vec<(std::path::PathBuf, String)> {
        std::fs::read_dir(&messages)
            .unwrap()
            .flatten()
            .map(|e| {
                (
                    e.path(),
                    std::fs::read_to_string(e.path()).unwrap_or_default(),
                )
            })
            .collect()
    };
    let is_dsn = |t: &str| t.contains("X-Sink-Mail-From: \r\n");
    assert!(
        wait_until(Duration::from_secs(30), || saved().iter().any(
            |(_, t)| is_dsn(t) && t.contains("report-type=delivery-status")
        )),
        "no delivery status notification for permfail@ reached the sink"
    );
    // The delivered copy verifies with python3-dkim against the key in DNS on loopback.
    let files: Vec<_> = saved()
        .into_iter()
        .filter(|(_, t)| !is_dsn(t))
        .map(|(p, _)| p)
        .collect();
    assert_eq!(files.len(), 1, "one copy reaches the sink");
    let text = std::fs::read_to_string(&files[0]).unwrap();
    assert!(
        text.contains("X-Sink-TLS: TLS"),
        "delivered without TLS:\n{text}"
    );
    assert!(text.contains("DKIM-Signature:"), "not signed:\n{text}");
    // `sluice up --metrics-port` gave each role its metrics: the worker counted the STARTTLS
    // session and the signature, the ingress the message.
    let worker = format!("http://127.0.0.1:{}/metrics", metrics + 2);
    let ingress = format!("http://127.0.0.1:{}/metrics", metrics + 1);
    let m = scrape_metrics(&[worker.clone(), ingress.clone()]).unwrap();
    assert!(metric_value(&m[&worker], "sluice_worker_tls_sessions_total", &[]) >= 1.0);
    assert!(metric_value(&m[&worker], "sluice_worker_dkim_sign_seconds_count", &[]) >= 1.0);
    assert_eq!(
        metric_value(&m[&ingress], "sluice_ingress_messages_accepted_total", &[]),
        1.0
    );
    let (_dns, dns_port) = start_dns(dir.path(), txt.trim());
    let (ok, out, err) = tool(
        "/usr/bin/python3",
        &[
            root.join("tests/dkim_verify.py").to_str().unwrap(),
            &dns_port.to_string(),
            files[0].to_str().unwrap(),
        ],
    );
    assert!(ok, "dkimverify rejected the signature: {out} {err}");

    // The permanent failure is a `b` row with its category; the queue keeps the deferred one.
    let rows = acct_rows(&acct);
    let b = rows
        .iter()
        .find(|r| r[0] == "b" && r[4] == "permfail@gmail.test")
        .expect("a b row for permfail@");
    assert_eq!(b[10], "bad-mailbox");
    let d = rows.iter().find(|r| r[0] == "d").unwrap();
    assert_eq!(d[4], "alice@gmail.test");
    assert_eq!(d[14], "127.0.0.1", "dlvSourceIp");
    assert_eq!(d[19], "e2e-1", "jobId");
    // A header_X column, and the same row from the gRPC accounting stream.
    assert!(
        wait_until(Duration::from_secs(5), || std::fs::read_to_string(
            data.join("controller-1/subjects.csv")
        )
        .unwrap_or_default()
        .contains("d,alice@gmail.test,end to end")),
        "subjects.csv: {:?}",
        std::fs::read_to_string(data.join("controller-1/subjects.csv"))
    );
    let (ok, out, err) = run(&[
        "acct",
        "-c",
        &grpc_addr,
        "--records",
        "d",
        "--fields",
        "type,rcpt,header_Subject",
    ]);
    assert!(ok, "sluice acct failed: {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "seq,type,rcpt,header_Subject");
    assert!(
        lines[1..]
            .iter()
            .any(|l| l.ends_with(",d,alice@gmail.test,end to end")),
        "{out}"
    );
    let (ok, _, err) = run(&["acct", "-c", &grpc_addr, "--fields", "nosuch"]);
    assert!(
        !ok && err.contains("unknown accounting field `nosuch`"),
        "{err}"
    );

    // tempfail@ is retried on the schedule (2s, then 3s), then expires after 20s.
    assert!(
        wait_until(Duration::from_secs(60), || acct_rows(&acct)
            .iter()
            .any(|r| r[0] == "b" && r[4] == "tempfail@gmail.test")),
        "tempfail@ did not expire:\n{}",
        std::fs::read_to_string(&acct).unwrap_or_default()
    );
    let rows = acct_rows(&acct);
    let t_rows: Vec<_> = rows
        .iter()
        .filter(|r| r[0] == "t" && r[4] == "tempfail@gmail.test")
        .collect();
    assert!(
        t_rows.len() >= 3,
        "expected at least 3 attempts on the schedule, got {}",
        t_rows.len()
    );
    let expired = rows
        .iter()
        .find(|r| r[0] == "b" && r[4] == "tempfail@gmail.test")
        .unwrap();
    assert_eq!(expired[10], "message-expired");
    let (_, q, _) = run(&["show", "queues", "--json", "-c", &grpc_addr]);
    let q: serde_json::Value = serde_json::from_str(&q).unwrap();
    assert_eq!(
        q.as_array().map(|a| a.len()),
        Some(0),
        "the queue is empty at the end: {q}"
    );
    assert!(up.stop().is_some());
}

/// The pid of the process whose command line holds `needle` (a path unique to one test).
fn pid_with(needle: &str) -> Option<i32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
        // A zombie is not running.
        let state = stat.rsplit(')').next()?.split_whitespace().next()?;
        (state != "Z" && String::from_utf8_lossy(&cmd).contains(needle)).then_some(pid)
    })
}

#[test]
fn sluice_up_restarts_a_process_that_dies_and_keeps_the_rest_running() {
    let dir = tempfile::tempdir().unwrap();
    let (smtp, http, sink) = (free_port(), free_port(), free_port());
    // Three controllers need three gRPC ports in a row.
    let grpc = free_ports(3);
    let policy = format!(
        "host-name sluice.example.com\nrun-as-root yes\n\
         <source 127.0.0.1>\n  always-allow-relaying yes\n  smtp-service yes\n  default-virtual-mta v\n</source>\n\
         <virtual-mta v>\n  smtp-source-host 127.0.0.1 mta.example.com\n</virtual-mta>\n\
         <domain *>\n  route [127.0.0.1]:{sink}\n</domain>\n\
         <acct-file acct.csv>\n  records d\n</acct-file>\n"
    );
    let policy_path = dir.path().join("policy.conf");
    std::fs::write(&policy_path, policy).unwrap();
    let data = dir.path().join("data");
    let mut up = spawn(
        dir.path(),
        "up",
        &[
            "up",
            "--controllers",
            "3",
            "--data-dir",
            data.to_str().unwrap(),
            "--policy",
            policy_path.to_str().unwrap(),
            "--smtp-port",
            &smtp.to_string(),
            "--http-port",
            &http.to_string(),
            "--grpc-port",
            &grpc.to_string(),
            "--sink-port",
            &sink.to_string(),
        ],
    );
    let smtp_addr: std::net::SocketAddr = format!("127.0.0.1:{smtp}").parse().unwrap();
    assert!(
        wait_for_port(smtp_addr, Duration::from_secs(60)),
        "sluice up did not start: {}",
        up.log_text()
    );
    let acct = data.join("controller-1/acct.csv");
    let delivered = |n: usize| {
        wait_until(Duration::from_secs(60), || {
            acct_rows(&acct).iter().filter(|r| r[0] == "d").count() >= n
        })
    };
    assert!(
        smtp_send(smtp_addr, "s@example.com", &["a@x.test"], "Subject: 1\n\nx").starts_with("250")
    );
    assert!(delivered(1), "{}", up.log_text());
    // kill -9 one controller (not the one whose accounting file is read) and the worker.
    for (name, needle) in [
        ("controller-2", data.join("controller-2.toml")),
        ("worker", data.join("worker.toml")),
    ] {
        let needle = needle.display().to_string();
        let pid = pid_with(&needle)
            .unwrap_or_else(|| panic!("no {name} process ({needle}): {}", up.log_text()));
        unsafe { libc::kill(pid, libc::SIGKILL) };
        assert!(
            wait_until(Duration::from_secs(30), || pid_with(&needle)
                .is_some_and(|p| p != pid)),
            "{name} was not restarted: {}",
            up.log_text()
        );
        assert!(
            up.log_text().contains(&format!("{name} exited"))
                && up.log_text().contains(&format!("{name} restarted")),
            "{}",
            up.log_text()
        );
    }
    assert!(up.is_running(), "sluice up stopped: {}", up.log_text());
    // The rest kept running and the restarted ones work: mail still flows, and the restarted
    // controller catches up.
    assert!(
        smtp_send(smtp_addr, "s@example.com", &["b@x.test"], "Subject: 2\n\nx").starts_with("250")
    );
    assert!(delivered(2), "{}", up.log_text());
    let tls_dir = data.join("tls");
    let ready = || {
        run_env(
            &[
                "cluster",
                "status",
                "--ready",
                "-c",
                &format!("127.0.0.1:{}", grpc + 1),
            ],
            &[("SLUICE_TLS_DIR", tls_dir.to_str().unwrap())],
        )
        .0
    };
    assert!(
        wait_until(Duration::from_secs(30), ready),
        "the restarted controller did not catch up"
    );
}

/// `sluice config check` prints the lint's warnings with file:line, counts them, still exits 0
/// for a policy that loads, and reads workers' settings files to find VMTAs nobody sends for.
#[test]
fn config_check_warns_about_classic_mistakes_and_unowned_source_ips() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("p.conf");
    std::fs::write(
        &policy,
        "smtp-listener 127.0.0.1:2525\n\
         <virtual-mta a>\n smtp-source-host 127.0.0.21 a.example.com\n</virtual-mta>\n\
         <virtual-mta b>\n smtp-source-host 127.0.0.22 b.example.com\n</virtual-mta>\n\
         <source 0/0>\n always-allow-relaying yes\n</source>\n\
         <domain *>\n retry-after 2d\n bounce-after 1d\n</domain>\n",
    )
    .unwrap();
    let worker = dir.path().join("w1.toml");
    std::fs::write(&worker, "[worker]\nsource_ips = [\"127.0.0.21\"]\n").unwrap();
    let p = policy.to_str().unwrap();
    let (ok, out, err) = run(&[
        "config",
        "check",
        p,
        "--worker-settings",
        worker.to_str().unwrap(),
    ]);
    assert!(ok, "a policy that loads passes with warnings: {err}");
    assert!(out.contains(": OK"), "{out}");
    for want in [
        format!("{p}:6: warning: virtual-mta `b`"),
        format!("{p}:9: warning: `<source 0/0>` with `always-allow-relaying yes` is an open relay"),
        format!("{p}:12: warning: `retry-after 2d` is longer than `bounce-after 1d`"),
        format!("{p}: 3 lint warning(s)"),
    ] {
        assert!(
            err.lines().any(|l| l.starts_with(&want)),
            "no `{want}` in:\n{err}"
        );
    }
    // Without workers' settings, source IPs are not checked.
    let (_, _, err) = run(&["config", "check", p]);
    assert!(err.contains("2 lint warning(s)"), "{err}");
    // A worker settings file that does not parse is an error, not a silent skip.
    std::fs::write(&worker, "[worker]\nsource_ips = [\"not-an-ip\"]\n").unwrap();
    let (ok, _, err) = run(&[
        "config",
        "check",
        p,
        "--worker-settings",
        worker.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("w1.toml"), "{err}");
}
