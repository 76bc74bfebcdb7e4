//! Several hosts for real: `deploy/testbed/testbed.sh` builds a cluster in network namespaces
//! (haproxy in front of two ingress hosts, three controllers, two worker hosts with two source
//! IPs each, a receiving host with dnsmasq and a sink, an operator host), joined by a bridge in
//! its own namespace, with addresses from 198.18.0.0/15 that exist only inside them. Each
//! scenario kills, cuts or adds hosts under traffic from `sluice gen` and checks what arrives.
//! Needs root; skipped with a message otherwise.

use crate::harness;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::harness::wait_until;

struct Testbed {
    dir: tempfile::TempDir,
    prefix: String,
    script: PathBuf,
}

impl Testbed {
    fn up() -> Option<Testbed> {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: the multi-host test bed needs root for network namespaces");
            return None;
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        Testbed::remove_orphans(&root);
        let tb = Testbed {
            dir: tempfile::tempdir().unwrap(),
            // Namespace names unique to this run.
            prefix: format!("sltb{}", std::process::id()),
            script: root.join("deploy/testbed/testbed.sh"),
        };
        let out = tb.sh(&["up"]);
        assert!(
            out.status.success(),
            "testbed up failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Some(tb)
    }

    /// Test beds of runs that were killed before they could clean up (their pid is gone).
    fn remove_orphans(root: &Path) {
        let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
            return;
        };
        let mut prefixes: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter_map(|n| n.strip_prefix("sltb"))
            .filter_map(|n| n.split_once('-').map(|(pid, _)| pid.to_string()))
            .filter(|pid| {
                pid.parse::<u32>().is_ok() && !Path::new(&format!("/proc/{pid}")).exists()
            })
            .collect();
        prefixes.sort();
        prefixes.dedup();
        for pid in prefixes {
            eprintln!("removing the test bed left by process {pid}");
            let _ = Command::new("bash")
                .arg(root.join("deploy/testbed/testbed.sh"))
                .arg("down")
                .env("TESTBED_PREFIX", format!("sltb{pid}"))
                .output();
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("bash");
        c.arg(&self.script)
            .args(args)
            .env("TESTBED_DIR", self.dir.path())
            .env("TESTBED_PREFIX", &self.prefix)
            .env("TESTBED_LEASE_TTL_MS", "5000")
            .env("SLUICE", env!("CARGO_BIN_EXE_sluice"));
        c
    }

    fn sh(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("bash runs the test bed")
    }

    /// `sluice ARGS` on the operator's host, with the operator's certificate: whether it
    /// succeeded, and its output (stdout alone on success, so that JSON parses).
    fn ops(&self, args: &[&str]) -> (bool, String) {
        let tls = self.dir.path().join("tls");
        let mut all = vec!["exec", "ops", env!("CARGO_BIN_EXE_sluice")];
        all.extend(["--tls-dir", tls.to_str().unwrap()]);
        all.extend(args);
        let out = self.sh(&all);
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        if out.status.success() {
            (true, stdout)
        } else {
            (false, stdout + &String::from_utf8_lossy(&out.stderr))
        }
    }

    /// Starts `sluice gen` on host `host` against `target`, writing acknowledged Message-IDs
    /// to a file named after `tag`.
    fn traffic(&self, host: &str, target: &str, tag: &str, args: &[&str]) -> Gen {
        let acked = self.dir.path().join(format!("acked-{tag}"));
        let mut all = vec!["exec", host, env!("CARGO_BIN_EXE_sluice"), "gen"];
        all.extend(["--target", target, "--size", "600", "--keep-going"]);
        all.extend(["--acked", acked.to_str().unwrap()]);
        all.extend(args);
        let child = self
            .command(&all)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Gen { child, acked }
    }

    /// Message-ID -> source IPs it arrived from, one per copy.
    fn arrived(&self) -> HashMap<String, Vec<String>> {
        let mut out: HashMap<String, Vec<String>> = HashMap::new();
        let dirs = ["rx/messages", "rx/slow-messages", "rx/shared-messages"]
            .map(|d| self.dir.path().join(d));
        let files = dirs
            .iter()
            .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten());
        for e in files {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            let head = |name: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.trim().to_string())
            };
            if let (Some(id), Some(peer)) = (head("Message-ID:"), head("X-Sink-Peer:")) {
                out.entry(id).or_default().push(peer);
            }
        }
        out
    }

    fn leader(&self) -> Option<String> {
        for c in ["198.18.0.21", "198.18.0.22", "198.18.0.23", "198.18.0.24"] {
            let (ok, out) = self.ops(&["cluster", "status", "--json", "-c", &format!("{c}:7400")]);
            if !ok {
                continue;
            }
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&out) else {
                continue;
            };
            match v["leader_id"].as_u64() {
                Some(id) if id > 0 => return Some(format!("c{id}")),
                _ => continue,
            }
        }
        None
    }

    fn dump(&self) {
        let logs = self.dir.path().join("logs");
        for e in std::fs::read_dir(logs).into_iter().flatten().flatten() {
            let t = std::fs::read_to_string(e.path()).unwrap_or_default();
            eprintln!("===== {}\n{}", e.path().display(), harness::tail(&t, 15));
        }
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump();
        }
        // Also when the test failed: every process and namespace goes.
        let _ = self.sh(&["down"]);
    }
}

struct Gen {
    child: Child,
    acked: PathBuf,
}

impl Gen {
    /// Waits for the generator to finish; returns the Message-IDs answered 250 and its summary.
    fn finish(mut self) -> (Vec<String>, String) {
        let deadline = Instant::now() + Duration::from_secs(180);
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "sluice gen did not finish");
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut summary = String::new();
        use std::io::Read;
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut summary)
            .unwrap();
        let acked = std::fs::read_to_string(&self.acked)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect();
        // The summary's first line: accepted, rate, refused, session errors.
        (acked, summary.lines().next().unwrap_or("").to_string())
    }
}

/// Waits until every acknowledged message has arrived; returns (arrived, duplicates).
fn all_arrive(tb: &Testbed, acked: &[String], what: &str) -> (usize, usize) {
    let ok = wait_until(Duration::from_secs(120), || {
        let got = tb.arrived();
        acked.iter().all(|id| got.contains_key(id))
    });
    let got = tb.arrived();
    let missing: Vec<&String> = acked.iter().filter(|id| !got.contains_key(*id)).collect();
    assert!(
        ok,
        "{what}: {} of {} acknowledged messages never arrived, e.g. {:?}",
        missing.len(),
        acked.len(),
        missing.iter().take(3).collect::<Vec<_>>()
    );
    let dups = acked.iter().map(|id| got[id].len().saturating_sub(1)).sum();
    (acked.len(), dups)
}

fn sink_stats(tb: &Testbed) -> serde_json::Value {
    harness::sink_stats(&tb.dir.path().join("rx/stats.json"))
}

#[test]
fn a_cluster_on_several_hosts_keeps_every_acknowledged_message() {
    let Some(tb) = Testbed::up() else { return };
    let lb = "198.18.0.2:25";
    let mut report = Vec::new();

    // 1. Pools: each message leaves from an IP of the pool its X-Virtual-MTA names.
    let a = tb.traffic(
        "ops",
        lb,
        "pool-a",
        &[
            "-n", "200", "-c", "4", "--domain", "a.test", "--vmta", "pool-a",
        ],
    );
    let b = tb.traffic(
        "ops",
        lb,
        "pool-b",
        &[
            "-n", "200", "-c", "4", "--domain", "b.test", "--vmta", "pool-b",
        ],
    );
    let (acked_a, _) = a.finish();
    let (acked_b, _) = b.finish();
    assert_eq!((acked_a.len(), acked_b.len()), (200, 200));
    all_arrive(&tb, &acked_a, "pool-a");
    all_arrive(&tb, &acked_b, "pool-b");
    let got = tb.arrived();
    let mut per_ip: BTreeMap<String, usize> = BTreeMap::new();
    for (ids, pool_prefix) in [(&acked_a, "198.18.1."), (&acked_b, "198.18.2.")] {
        for id in ids {
            for ip in &got[id] {
                assert!(
                    ip.starts_with(pool_prefix),
                    "{id} left from {ip}, not {pool_prefix}*"
                );
                *per_ip.entry(ip.clone()).or_default() += 1;
            }
        }
    }
    assert_eq!(
        per_ip.len(),
        4,
        "every source IP of both pools is used: {per_ip:?}"
    );
    report.push(format!(
        "pools: 400 acknowledged, 400 arrived, per source IP {per_ip:?}"
    ));

    // 2. The operator's CLI reaches the cluster through any controller.
    for c in ["198.18.0.21", "198.18.0.22", "198.18.0.23"] {
        let (ok, out) = tb.ops(&["show", "status", "-c", &format!("{c}:7400")]);
        assert!(ok && out.contains("leader"), "{c}: {out}");
    }
    report.push("cli: show status answered through each of the 3 controllers".into());

    // 3. Budgets hold at the receiver with both worker hosts sending to one destination: every
    // queue (c.test through each VMTA) keeps max-smtp-out 2 and max-msg-rate 30/10s.
    let ca = tb.traffic(
        "ops",
        lb,
        "c-a",
        &[
            "-n", "120", "-c", "4", "--domain", "c.test", "--vmta", "pool-a",
        ],
    );
    let cb = tb.traffic(
        "ops",
        lb,
        "c-b",
        &[
            "-n", "120", "-c", "4", "--domain", "c.test", "--vmta", "pool-b",
        ],
    );
    let (acked_ca, _) = ca.finish();
    let (acked_cb, _) = cb.finish();
    assert_eq!((acked_ca.len(), acked_cb.len()), (120, 120));
    let all_c: Vec<String> = acked_ca.iter().chain(&acked_cb).cloned().collect();
    all_arrive(&tb, &all_c, "budgets");
    // The sink writes its stats every second: wait until they hold every arrival.
    let counted = |st: &serde_json::Value| {
        st["queues"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, _)| k.ends_with(" c.test"))
            .map(|(_, q)| q["timestamps_ms"].as_array().map_or(0, |a| a.len()))
            .sum::<usize>()
    };
    assert!(wait_until(Duration::from_secs(10), || counted(
        &sink_stats(&tb)
    ) >= 240));
    let st = sink_stats(&tb);
    let mut budgets = Vec::new();
    for ip in ["198.18.1.1", "198.18.1.2", "198.18.2.1", "198.18.2.2"] {
        let q = &st["queues"][format!("{ip} c.test")];
        let conns = q["max_concurrent"].as_u64().unwrap_or(0);
        let ts: Vec<u64> = q["timestamps_ms"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t.as_u64())
            .collect();
        let worst = harness::max_in_window(&ts, 10_000);
        assert!(
            conns <= 2,
            "{ip}: {conns} connections at once (max-smtp-out 2)"
        );
        assert!(
            worst <= 30,
            "{ip}: {worst} messages in one 10 s window (limit 30)"
        );
        budgets.push(format!(
            "{ip}: {} msgs, {conns} conns, {worst}/10s",
            ts.len()
        ));
    }
    report.push(format!("budgets: {}", budgets.join("; ")));

    // 3b. One queue served from both worker hosts (its VMTA has no source IP of its own):
    // its one budget holds across them.
    let g = tb.traffic(
        "ops",
        lb,
        "shared",
        &[
            "-n",
            "90",
            "-c",
            "3",
            "--domain",
            "shared.test",
            "--vmta",
            "shared",
        ],
    );
    let (acked_s, _) = g.finish();
    assert_eq!(acked_s.len(), 90);
    all_arrive(&tb, &acked_s, "shared queue");
    let shared = tb.dir.path().join("rx/shared-stats.json");
    let arrivals = |st: &serde_json::Value| -> Vec<(String, u64)> {
        st["queues"]
            .as_object()
            .into_iter()
            .flatten()
            .flat_map(|(k, q)| {
                let ip = k.split(' ').next().unwrap_or("").to_string();
                q["timestamps_ms"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|t| t.as_u64())
                    .map(move |t| (ip.clone(), t))
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    assert!(wait_until(Duration::from_secs(10), || arrivals(
        &harness::sink_stats(&shared)
    )
    .len()
        >= 90));
    let st = harness::sink_stats(&shared);
    let got = arrivals(&st);
    let ts: Vec<u64> = got.iter().map(|a| a.1).collect();
    let worst = harness::max_in_window(&ts, 10_000);
    let conns = st["listeners"]["198.18.0.40:2527"]["max_concurrent"]
        .as_u64()
        .unwrap_or(0);
    let hosts: BTreeMap<&str, usize> = got.iter().fold(BTreeMap::new(), |mut m, (ip, _)| {
        *m.entry(if ip.starts_with("198.18.1.") {
            "w1"
        } else {
            "w2"
        })
        .or_default() += 1;
        m
    });
    assert!(
        conns <= 2,
        "{conns} connections at once across hosts (max-smtp-out 2)"
    );
    assert!(
        worst <= 30,
        "{worst} messages in one 10 s window across hosts (limit 30)"
    );
    assert_eq!(
        hosts.len(),
        2,
        "both worker hosts send the shared queue: {hosts:?}"
    );
    report.push(format!(
        "one queue from both hosts: {} msgs ({hosts:?}), at most {conns} connections at once, {worst} in a 10 s window",
        got.len()
    ));

    // 4. The only worker of pool-b is gone: its mail stays queued, then goes when it is back.
    assert!(tb.sh(&["kill", "w2"]).status.success());
    let g = tb.traffic(
        "ops",
        lb,
        "w2-down",
        &[
            "-n", "30", "-c", "2", "--domain", "b.test", "--vmta", "pool-b",
        ],
    );
    let (acked_w, _) = g.finish();
    assert_eq!(acked_w.len(), 30);
    let queued = || {
        let (_, out) = tb.ops(&["show", "queues", "--json", "-c", "198.18.0.21:7400"]);
        serde_json::from_str::<serde_json::Value>(&out)
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter(|q| q["queue"] == "b.test")
            .filter_map(|q| q["recipients"].as_u64())
            .sum::<u64>()
    };
    assert!(
        wait_until(Duration::from_secs(30), || queued() == 30),
        "pool-b's mail is not queued: {}",
        queued()
    );
    // `show status` says why the mail waits.
    let why =
        "stalled     b.test/pool-b: 30 recipients wait; no live worker owns 198.18.2.1, 198.18.2.2";
    assert!(
        wait_until(Duration::from_secs(40), || tb
            .ops(&["show", "status", "-c", "198.18.0.22:7400"])
            .1
            .contains(why)),
        "{}",
        tb.ops(&["show", "status", "-c", "198.18.0.22:7400"]).1
    );
    let early = tb.arrived();
    assert!(
        acked_w.iter().all(|id| !early.contains_key(id)),
        "delivered without a worker"
    );
    assert!(tb.sh(&["start", "w2"]).status.success());
    let (n, d) = all_arrive(&tb, &acked_w, "worker host back");
    report.push(format!(
        "worker host w2 killed: 30 queued meanwhile, show status said `{why}`; back: {n} arrived, {d} duplicates"
    ));

    // 4b. A worker host killed mid-delivery: its leases expire and the standby that takes over
    // its source IPs (as keepalived would move them) delivers what was in flight.
    let g = tb.traffic(
        "ops",
        lb,
        "takeover",
        &[
            "-n",
            "40",
            "-c",
            "2",
            "--domain",
            "slow.test",
            "--vmta",
            "pool-a",
        ],
    );
    let (acked_t, _) = g.finish();
    assert_eq!(acked_t.len(), 40);
    let slow = tb.dir.path().join("rx/slow-stats.json");
    let in_flight = || {
        let st = harness::sink_stats(&slow);
        st["listeners"]["198.18.0.40:2526"]["connections"]
            .as_u64()
            .unwrap_or(0)
    };
    assert!(
        wait_until(Duration::from_secs(30), || in_flight() > 0),
        "no delivery to the slow receiver started"
    );
    let before = tb.arrived();
    let done_before = acked_t.iter().filter(|id| before.contains_key(*id)).count();
    // The receiver answers 2 s after the content: the first connection has not finished.
    assert!(
        done_before < acked_t.len(),
        "all were delivered before the kill"
    );
    assert!(tb.sh(&["takeover"]).status.success());
    let (n, d) = all_arrive(&tb, &acked_t, "worker takeover");
    let got = tb.arrived();
    for id in &acked_t {
        assert!(
            got[id].iter().all(|ip| ip.starts_with("198.18.1.")),
            "{id}: {:?}",
            got[id]
        );
    }
    report.push(format!(
        "worker host w1 killed mid-delivery ({done_before} of 40 delivered before), w3 took its IPs: {n} arrived, {d} duplicates"
    ));

    // 5. An ingress host killed mid-traffic: haproxy moves clients to the other one, and no
    // message answered 250 is lost.
    let g = tb.traffic(
        "ops",
        lb,
        "ingress-kill",
        &["--duration", "6", "-c", "6", "--domain", "a.test"],
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(tb.sh(&["kill", "in1"]).status.success());
    let (acked_i, summary) = g.finish();
    let after = tb.traffic(
        "ops",
        lb,
        "after-ingress-kill",
        &["-n", "50", "-c", "2", "--domain", "a.test"],
    );
    let (acked_after, _) = after.finish();
    assert_eq!(acked_after.len(), 50, "haproxy did not move traffic to in2");
    let (n, d) = all_arrive(&tb, &acked_i, "ingress kill");
    report.push(format!(
        "ingress host in1 killed: {n} acknowledged, all arrived, {d} duplicates ({summary}); 50/50 accepted after"
    ));
    assert!(tb.sh(&["start", "in1"]).status.success());

    // 6. kill -9 of the leader's host under traffic, then restart.
    let leader = tb.leader().expect("a leader");
    let g = tb.traffic(
        "ops",
        lb,
        "leader-kill",
        &[
            "--duration",
            "8",
            "-c",
            "6",
            "--domain",
            "a.test",
            "--domain",
            "b.test",
            "--vmta",
            "pool-a",
        ],
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(tb.sh(&["kill", &leader]).status.success());
    std::thread::sleep(Duration::from_secs(3));
    assert!(tb.sh(&["start", &leader]).status.success());
    let (acked_l, summary) = g.finish();
    assert!(!acked_l.is_empty());
    let (n, d) = all_arrive(&tb, &acked_l, "leader host kill");
    report.push(format!("leader host {leader} killed and restarted: {n} acknowledged, all arrived, {d} duplicates ({summary})"));

    // 7. A partition: the leader's link down for 20 s under traffic. The majority goes on; the
    // cut-off controller acknowledges nothing, even to an ingress beside it.
    let leader = tb.leader().expect("a leader");
    let ip = format!("198.18.0.2{}", &leader[1..]);
    let g = tb.traffic(
        "ops",
        lb,
        "partition",
        &["--duration", "24", "-c", "4", "--domain", "a.test"],
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(tb.sh(&["link", &leader, "down"]).status.success());
    let cut = Instant::now();
    let settings = tb.dir.path().join("minority-ingress.toml");
    std::fs::write(
        &settings,
        format!(
            "data_dir = \"{}\"\ncontrollers = [\"{ip}:7400\"]\n[ingress]\nname = \"in1\"\nsmtp_listen = [\"{ip}:2525\"]\nhttp_listen = \"{ip}:8026\"\n[tls]\nca = \"{d}/ca.pem\"\ncert = \"{d}/ingress-in1.pem\"\nkey = \"{d}/ingress-in1.key\"\n",
            tb.dir.path().join("minority-ingress").display(),
            d = tb.dir.path().join("tls").display()
        ),
    )
    .unwrap();
    let mut minority_ingress = tb
        .command(&[
            "exec",
            &leader,
            env!("CARGO_BIN_EXE_sluice"),
            "ingress",
            "--settings",
            settings.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let m = tb.traffic(
        &leader,
        &format!("{ip}:2525"),
        "minority",
        &["-n", "3", "-c", "1"],
    );
    let (acked_m, summary_m) = m.finish();
    let _ = minority_ingress.kill();
    let _ = minority_ingress.wait();
    assert!(
        acked_m.is_empty(),
        "the minority side acknowledged {acked_m:?}: {summary_m}"
    );
    let rest = Duration::from_secs(20).saturating_sub(cut.elapsed());
    std::thread::sleep(rest);
    assert!(tb.sh(&["link", &leader, "up"]).status.success());
    let (acked_p, summary) = g.finish();
    assert!(!acked_p.is_empty());
    let (n, d) = all_arrive(&tb, &acked_p, "partition");
    report.push(format!(
        "partition of {leader} for 20 s: {n} acknowledged on the majority side, all arrived, {d} duplicates ({summary}); minority side: {}",
        summary_m.lines().next().unwrap_or("")
    ));

    // 8. Membership under traffic: a fourth controller joins, then one of the first leaves.
    let g = tb.traffic(
        "ops",
        lb,
        "membership",
        &["--duration", "10", "-c", "4", "--domain", "a.test"],
    );
    assert!(tb.sh(&["start", "c4"]).status.success());
    assert!(
        wait_until(Duration::from_secs(30), || tb
            .ops(&["cluster", "status", "--json", "-c", "198.18.0.24:7400"])
            .1
            .contains("node_id")),
        "c4 did not start"
    );
    let (ok, out) = tb.ops(&[
        "cluster",
        "add",
        "4",
        "198.18.0.24:7400",
        "-c",
        "198.18.0.21:7400",
    ]);
    assert!(ok, "cluster add: {out}");
    let leader = tb.leader().expect("a leader");
    let gone = ["c1", "c2", "c3"]
        .into_iter()
        .find(|c| *c != leader)
        .unwrap();
    let (ok, out) = tb.ops(&["cluster", "remove", &gone[1..], "-c", "198.18.0.24:7400"]);
    assert!(ok, "cluster remove: {out}");
    assert!(tb.sh(&["kill", gone]).status.success());
    let (acked_c, summary) = g.finish();
    let (n, d) = all_arrive(&tb, &acked_c, "membership");
    let (_, out) = tb.ops(&["cluster", "status", "--json", "-c", "198.18.0.24:7400"]);
    let st: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    let mut voters: Vec<u64> = st["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["voter"] == true)
        .filter_map(|n| n["node_id"].as_u64())
        .collect();
    voters.sort_unstable();
    let mut want: Vec<u64> = [1, 2, 3, 4]
        .into_iter()
        .filter(|i| format!("c{i}") != gone)
        .collect();
    want.sort_unstable();
    assert_eq!(voters, want, "{st}");
    report.push(format!(
        "membership: c4 added, {gone} removed under traffic; voters {voters:?}; {n} acknowledged, all arrived, {d} duplicates ({summary})"
    ));

    println!("multi-host scenarios:\n  {}", report.join("\n  "));
}
