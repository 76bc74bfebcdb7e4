#!/usr/bin/python3
"""End-to-end benchmark on loopback: one hop (smtp-source -> smtp-sink), Postfix relaying to a
sink with its queue on disk, and Sluice with 1 and 3 controllers. Prints a markdown table.

--worker also runs Postfix with an OpenDKIM milter (`apt install opendkim`) when it is there.

Usage: tests/bench/bench.py [--messages N] [--sizes 5120,102400] [--bin PATH]
                           [--baseline-bin PATH --baseline-name NAME] [--tls-cost] [--disk-cost]
                           [--base64-rows]
Ratios are against rows measured in the same run, because the machine is noisy. With
--baseline-bin, the Sluice rows are also run with another build (an earlier commit, say), so
that the cost of a change is measured in the same run. --disk-cost also runs each Sluice row
with its queue on tmpfs (/dev/shm): no disk I/O and no sync costs anything there, so the row
bounds what any cheaper or overlapped commit could gain. `sluice gen`'s bodies repeat one line
and compress about 20:1; --base64-rows also runs each Sluice row with bodies of random base64
lines (an attachment's), which hardly compress."""
import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port, timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def pct(values, p):
    if not values:
        return 0.0
    v = sorted(values)
    return v[min(len(v) - 1, int(round((len(v) - 1) * p)))]


def sink_stats(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def wait_sink(path, n, timeout):
    end = time.time() + timeout
    while time.time() < end:
        if sink_stats(path).get("messages", 0) >= n:
            return True
        time.sleep(0.2)
    return False


# Concurrent injecting sessions for every row (`--sessions`).
SESSIONS = 50


def smtp_source(port, n, size, sessions=None, sender="bench@example.com", rcpt="user@bench.test"):
    t0 = time.time()
    subprocess.run(["smtp-source", "-c", "-s", str(sessions or SESSIONS), "-m", str(n), "-l", str(size), "-f", sender, "-t", rcpt,
                    "127.0.0.1:%d" % port], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.time() - t0


def one_hop(n, size):
    port = free_port()
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    sink = subprocess.Popen(["smtp-sink", *user, "-c", "127.0.0.1:%d" % port, "1000"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        secs = smtp_source(port, n, size)
        return {"accepted": n / secs, "delivered": n / secs, "p50": None, "p99": None, "rss": ""}
    finally:
        sink.kill()
        sink.wait()


def sluice_sink(binary, tmp):
    port = free_port()
    stats = os.path.join(tmp, "sink-%d.json" % port)
    p = subprocess.Popen([binary, "sink", "--listen", "127.0.0.1:%d" % port, "--stats", stats],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return p, port, stats


def postfix(binary, n, size, tmp, dkim_key=None):
    """A private Postfix instance on loopback, relaying everything to a sink; with `dkim_key`,
    an OpenDKIM milter signs each message as Postfix receives it. None when either is missing."""
    if not shutil.which("postfix"):
        return None
    milter = opendkim(tmp, dkim_key) if dkim_key else None
    if dkim_key and not milter:
        return None
    try:
        return postfix_run(binary, n, size, tmp, milter)
    finally:
        if milter:
            milter[0].kill()
            milter[0].wait()


def postfix_run(binary, n, size, tmp, milter):
    tmp = tempfile.mkdtemp(dir=tmp)  # a fresh instance per run
    sink, sport, stats = sluice_sink(binary, tmp)
    conf = os.path.join(tmp, "postfix-conf")
    env = dict(os.environ, MAIL_CONFIG=conf)
    try:
        port = free_port()
        queue = os.path.join(tmp, "postfix-queue")
        data = os.path.join(tmp, "postfix-data")
        os.makedirs(conf)
        shutil.copy("/etc/postfix/master.cf", conf) if os.path.exists("/etc/postfix/master.cf") else None
        main = f"""
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
mail_owner = postfix
myhostname = bench.example.com
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:{sport}
smtpd_relay_restrictions = permit_mynetworks, reject
default_destination_concurrency_limit = 50
smtp_tls_security_level = none
"""
        if milter:
            main += "smtpd_milters = inet:127.0.0.1:%d\nmilter_default_action = tempfail\n" % milter[1]
        with open(os.path.join(conf, "main.cf"), "w") as f:
            f.write(main)
        with open(os.path.join(conf, "master.cf")) as f:
            master = f.read()
        master = master.replace("smtp      inet  n       -       y       -       -       smtpd",
                                "127.0.0.1:%d      inet  n       -       n       -       -       smtpd" % port)
        master = "\n".join(l for l in master.splitlines() if not l.startswith("postlog"))
        with open(os.path.join(conf, "master.cf"), "w") as f:
            f.write(master)
        # The postfix user must reach its data directory.
        os.chmod(tmp, 0o755)
        os.chmod(os.path.dirname(tmp), 0o755)
        os.makedirs(queue)
        os.makedirs(data)
        shutil.chown(data, "postfix")
        # postfix(1) only starts a private configuration that the default main.cf allows.
        if not os.path.exists("/etc/postfix/main.cf"):
            open("/etc/postfix/main.cf", "a").close()
        subprocess.run(["postconf", "-e", "alternate_config_directories = %s" % conf], check=True)
        subprocess.run(["postfix", "-c", conf, "set-permissions"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        r = subprocess.run(["postfix", "-c", conf, "start"], env=env, capture_output=True, text=True)
        if r.returncode != 0 or not wait_port(port, 20):
            sys.stderr.write("postfix did not start: %s\n" % (r.stderr or r.stdout))
            return None
        t0 = time.time()
        secs = smtp_source(port, n, size)
        ok = wait_sink(stats, n, 600)
        st = sink_stats(stats)
        delivered = st.get("messages", 0) / max(0.001, (st.get("last_ms", 0) / 1000.0 - t0)) if ok else 0
        return {"accepted": n / secs, "delivered": delivered, "p50": None, "p99": None, "rss": ""}
    finally:
        subprocess.run(["postfix", "-c", conf, "stop"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1)
        sink.kill()
        sink.wait()


def opendkim(tmp, key):
    """OpenDKIM as a signing milter for example.com (selector `sluice`), in the foreground;
    returns the process and its port, or None (with the reason) when it is not installed."""
    if not shutil.which("opendkim"):
        sys.stderr.write("no opendkim (apt install opendkim): the Postfix DKIM row is left out\n")
        return None
    port = free_port()
    conf = os.path.join(tmp, "opendkim-%d.conf" % port)
    with open(conf, "w") as f:
        f.write(f"""Syslog no
Background no
Mode s
Domain example.com
Selector sluice
KeyFile {key}
RequireSafeKeys no
Canonicalization relaxed/relaxed
SignatureAlgorithm rsa-sha256
InternalHosts 127.0.0.1
Socket inet:{port}@127.0.0.1
""")
    p = subprocess.Popen(["opendkim", "-f", "-x", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not wait_port(port, 20):
        p.kill()
        p.wait()
        sys.stderr.write("opendkim did not start\n")
        return None
    return p, port


def node_processes(data_dir):
    """(pid, role) of each process started with `data_dir` in its arguments (`sluice up`
    itself has the role "up")."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                cmd = f.read().split(b"\0")
        except OSError:
            continue
        if len(cmd) >= 2 and any(data_dir.encode() in c for c in cmd):
            out.append((pid, cmd[1].decode(errors="replace")))
    return out


def node_memory(data_dir):
    """(role, RSS MB, peak RSS MB) of each process started with `data_dir` in its arguments."""
    out = []
    for pid, role in node_processes(data_dir):
        try:
            with open("/proc/%s/status" % pid) as f:
                st = dict(l.split(":", 1) for l in f if ":" in l)
            out.append((role, int(st["VmRSS"].split()[0]) // 1024, int(st["VmHWM"].split()[0]) // 1024))
        except (OSError, KeyError, ValueError):
            pass
    return out


def peak_rss(data_dir):
    out = {}
    for role, _, hwm in node_memory(data_dir):
        if role in ("controller", "ingress", "worker"):
            out.setdefault(role if role != "controller" else "ctl", []).append(hwm)
    return ", ".join("%s %s MB" % (k, "/".join(str(x) for x in v)) for k, v in sorted(out.items()))


def relay_policy(path, sport, max_out=50, received=False, dkim_key=None):
    """A policy relaying everything from loopback to the sink on `sport`, signing with
    `dkim_key` for example.com (selector `sluice`) when given."""
    with open(path, "w") as f:
        f.write(("domain-key sluice,example.com,%s\n" % dkim_key if dkim_key else "") + f"""run-as-root yes
<virtual-mta v1>
  smtp-source-host 127.0.0.1 bench.example.com
</virtual-mta>
<source 127.0.0.1>
  always-allow-relaying yes
  default-virtual-mta v1
{"  add-received-header yes" if received else ""}
</source>
<domain *>
  route [127.0.0.1]:{sport}
  max-smtp-out {max_out}
  max-msg-per-connection 1000
  use-starttls no
  dkim-sign {"yes" if dkim_key else "no"}
</domain>
""")


def sluice(binary, controllers, n, size, tmp, injector="gen", plaintext=False, dkim_key=None, base64_body=False):
    tmp = tempfile.mkdtemp(dir=tmp)  # a fresh queue per run
    sink, sport, stats = sluice_sink(binary, tmp)
    data = os.path.join(tmp, "sluice-%d-%d" % (controllers, size))
    policy = os.path.join(tmp, "bench-%d.conf" % sport)
    relay_policy(policy, sport, received=True, dkim_key=dkim_key)
    up, smtp = start_up(binary, controllers, data, policy, plaintext)
    try:
        if not wait_port(smtp, 60):
            return None
        time.sleep(1)
        t0 = time.time()
        if injector == "smtp-source":
            secs = smtp_source(smtp, n, size)
            summary = {"accepted": n, "rate": n / secs}
        else:
            summary = gen(binary, smtp, n, size, base64_body)
        ok = wait_sink(stats, summary["accepted"], 600)
        time.sleep(1.2)
        st = sink_stats(stats)
        rss = peak_rss(data)
        delivered = st.get("messages", 0) / max(0.001, st.get("last_ms", 0) / 1000.0 - t0) if ok else 0
        lat = st.get("latencies_ms", [])
        return {"accepted": summary["rate"], "delivered": delivered, "p50": pct(lat, 0.5), "p99": pct(lat, 0.99), "rss": rss}
    finally:
        stop(up, None, sink)


def start_up(binary, controllers, data, policy, plaintext=False):
    """`sluice up` without its own sink; returns the process and its SMTP port."""
    smtp, http, grpc = free_port(), free_port(), free_port()
    up = subprocess.Popen([binary, "up", "--no-sink", "--controllers", str(controllers), "--data-dir", data, "--policy", policy,
                           "--smtp-port", str(smtp), "--http-port", str(http), "--grpc-port", str(grpc)]
                          + (["--plaintext"] if plaintext else []),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return up, smtp


def gen(binary, smtp, n, size, base64_body=False):
    """`sluice gen` over SESSIONS connections; returns its JSON summary (accepted, rate)."""
    g = subprocess.run([binary, "gen", "--target", "127.0.0.1:%d" % smtp, "-c", str(SESSIONS), "-n", str(n), "--size", str(size),
                        "--domain", "bench.test", "--json"] + (["--base64-body"] if base64_body else []),
                       capture_output=True, text=True)
    return json.loads(g.stdout.strip().splitlines()[-1])


def start_without_worker(binary, data, policy):
    """`sluice up` with no sink and no worker; returns the process and its SMTP port."""
    smtp, http, grpc = free_port(), free_port(), free_port()
    up = subprocess.Popen([binary, "up", "--no-sink", "--no-worker", "--data-dir", data, "--policy", policy,
                           "--smtp-port", str(smtp), "--http-port", str(http), "--grpc-port", str(grpc)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return up, smtp


def start_worker(binary, data, env=None):
    """The worker `sluice up` configured in `data`, with extra environment settings."""
    return subprocess.Popen([binary, "worker", "--settings", os.path.join(data, "worker.toml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, **(env or {})))


def stop(up, worker, *sinks):
    if worker:
        worker.kill()
        worker.wait()
    up.send_signal(signal.SIGINT)
    try:
        up.wait(30)
    except subprocess.TimeoutExpired:
        up.kill()
    for p in sinks:
        p.kill()
        p.wait()


def worker_rows(binary, n, size, tmp, baseline=None, baseline_name="baseline"):
    """Issue 6: one worker delivering N queued messages to a local sink, against smtp-source
    sending straight to the same sink. Without DKIM, with RSA-2048 and with Ed25519 keys, and
    with and without TLS (without TLS only when a baseline build runs the same rows). Then
    flow-through rows, smtp-source -> relay -> sink, for Postfix (signing with an OpenDKIM milter
    as it receives) and Sluice (1 controller, the worker signing as it delivers), each without
    DKIM and with RSA-2048: Postfix has no queued-drain mode to set beside the worker rows.
    Rows are (name, msg/s, the matching Postfix row's msg/s or None)."""
    rows = []
    keys = {"RSA-2048": os.path.join(tmp, "rsa.pem"), "Ed25519": os.path.join(tmp, "ed25519.pem")}
    subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", keys["RSA-2048"]],
                   check=True, capture_output=True)
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", keys["Ed25519"]], check=True, capture_output=True)
    builds = [(binary, "")] + ([(baseline, " (%s)" % baseline_name)] if baseline else [])
    for tls in ((False,) if baseline else (False, True)):
        sink, sport, stats = sluice_sink_args(binary, tmp, ["--tls"] if tls else [])
        t_hop = smtp_source(sport, n, size)
        rows.append(("one hop: smtp-source -> sink%s" % (" offering TLS (smtp-source stays in clear)" if tls else ""), n / t_hop, None))
        sink.kill()
        sink.wait()
        for dkim, (build, build_name) in [(d, b) for d in (None, "RSA-2048", "Ed25519") for b in builds]:
            sink, sport, stats = sluice_sink_args(binary, tmp, ["--tls"] if tls else [])
            tag = "%d-%d-%s-%d" % (size, tls, dkim, build == binary)
            data = os.path.join(tmp, "w-" + tag)
            policy = os.path.join(tmp, "w-%s.conf" % tag)
            with open(policy, "w") as f:
                f.write("run-as-root yes\n" + ("domain-key sluice,example.com,%s\n" % keys[dkim] if dkim else "") + f"""<virtual-mta v1>
  smtp-source-host 127.0.0.1 bench.example.com
</virtual-mta>
<source 127.0.0.1>
  always-allow-relaying yes
  default-virtual-mta v1
</source>
<domain *>
  route [127.0.0.1]:{sport}
  max-smtp-out 50
  max-msg-per-connection 1000
  use-starttls {"yes" if tls else "no"}
  dkim-sign {"yes" if dkim else "no"}
</domain>
""")
            up, smtp = start_without_worker(build, data, policy)
            worker = None
            try:
                wait_port(smtp, 60)
                smtp_source(smtp, n, size)
                worker = start_worker(build, data)
                t0 = time.time()
                ok = wait_sink(stats, n, 600)
                st = sink_stats(stats)
                rate = n / max(0.001, st.get("last_ms", 0) / 1000.0 - t0) if ok else 0
                rows.append(("worker%s%s%s" % (", DKIM " + dkim if dkim else "", ", TLS" if tls else "", build_name), rate, None))
            finally:
                stop(up, worker, sink)
    for dkim in (None, "RSA-2048"):
        key = keys[dkim] if dkim else None
        pf = postfix(binary, n, size, tmp, dkim_key=key)
        pf_rate = pf["delivered"] if pf else None
        label = ", DKIM %s" % dkim if dkim else ""
        if pf:
            rows.append(("flow-through: Postfix%s" % (" + OpenDKIM milter" + label if dkim else ""), pf_rate, None))
        for build, build_name in builds:
            r = sluice(build, 1, n, size, tmp, injector="smtp-source", dkim_key=key)
            rows.append(("flow-through: Sluice, 1 controller%s%s" % (label, build_name), r["delivered"] if r else 0, pf_rate))
    return rows


def rss_mb(data_dir, role="controller"):
    """Present and peak RSS (MB) of the `role` process started with `data_dir`."""
    return next(((r, h) for name, r, h in node_memory(data_dir) if name == role), (0, 0))


def wait_recipients(path, n, timeout):
    # Once a second: the stats file holds a timestamp per message, and parsing it takes CPU
    # from the drain being measured.
    end = time.time() + timeout
    while time.time() < end:
        if sink_stats(path).get("recipients", 0) >= n:
            return True
        time.sleep(1)
    return False


def queued(binary, grpc, tls_dir):
    """The leader's queued recipients, or None while it does not answer."""
    r = subprocess.run([binary, "show", "status", "--json", "-c", "127.0.0.1:%d" % grpc, "--tls-dir", tls_dir],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return None
    try:
        return json.loads(r.stdout)["queued_recipients"]
    except (ValueError, KeyError):
        return None


def up_ports(binary, data, policy, worker):
    smtp, http, grpc = free_port(), free_port(), free_port()
    up = subprocess.Popen([binary, "up", "--no-sink", "--data-dir", data, "--policy", policy, "--smtp-port", str(smtp),
                           "--http-port", str(http), "--grpc-port", str(grpc)] + ([] if worker else ["--no-worker"]),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return up, smtp, grpc


def inject(binary, smtp, messages, per_msg, domains, size=1024):
    gen = subprocess.run([binary, "gen", "--target", "127.0.0.1:%d" % smtp, "-c", "20", "-n", str(messages), "--size", str(size),
                          "--domain", "bench.test", "--spread", str(domains), "--rcpts", str(per_msg), "--json"],
                         capture_output=True, text=True)
    return json.loads(gen.stdout.strip().splitlines()[-1])


def restart_time(binary, up, data, policy, expect):
    """Stops `sluice up` and starts it again without a worker; seconds until the leader answers
    with `expect` recipients queued, and the restarted process."""
    up.send_signal(signal.SIGINT)
    up.wait(120)
    t0 = time.time()
    up, smtp, grpc = up_ports(binary, data, policy, worker=False)
    try:
        while time.time() - t0 < 600:
            if queued(binary, grpc, os.path.join(data, "tls")) == expect:
                return time.time() - t0, up, smtp, grpc
            time.sleep(0.05)
    except BaseException:
        stop(up, None)  # the caller only holds the process that was stopped
        raise
    return None, up, smtp, grpc


def backlog_rows(binary, recipients, per_msg, domains, flow, big, tmp):
    """Issue 18: a backlog of `recipients` 1 KB recipients over `domains` domains drained by one
    worker, against the flow-through rate (injected with the worker running) of `flow`
    recipients with the same policy, and restart times with `recipients` and `big` queued."""
    rows = []
    sink, sport, stats = sluice_sink_args(binary, tmp, [])
    try:
        t_hop = smtp_source(sport, 20000, 1024)
    finally:
        stop_sink(sink)
    rows.append(("one hop: smtp-source -> sink, 1 KB", "%.0f msg/s" % (20000 / t_hop)))
    pf = postfix(binary, 20000, 1024, tmp)
    rows.append(("Postfix relaying to the sink, 1 KB, one recipient per message",
                 "%.0f msg/s" % pf["delivered"] if pf else "not available"))

    sink, sport, stats = sluice_sink_args(binary, tmp, [])
    policy = os.path.join(tmp, "backlog.conf")
    relay_policy(policy, sport, max_out=4)
    data = os.path.join(tmp, "flow")
    up, smtp, grpc = up_ports(binary, data, policy, worker=True)
    try:
        wait_port(smtp, 60)
        time.sleep(1)
        t0 = time.time()
        g = inject(binary, smtp, flow // per_msg, per_msg, domains)
        n = g["recipients"]
        ok = wait_recipients(stats, n, 1800)
        st = sink_stats(stats)
        flow_rate = n / max(0.001, st.get("last_ms", 0) / 1000.0 - t0) if ok else 0
        rows.append(("flow-through: %d recipients injected (%d per message) with the worker running" % (n, per_msg),
                     "%.0f rcpt/s, leader peak RSS %d MB" % (flow_rate, rss_mb(data)[1])))
    finally:
        stop(up, None, sink)

    sink, sport, stats = sluice_sink_args(binary, tmp, [])
    try:
        rows += drain_rows(binary, recipients, per_msg, domains, big, flow_rate, policy, sport, stats, tmp)
    finally:
        stop_sink(sink)
    return rows


def stop_sink(sink):
    sink.kill()
    sink.wait()


def drain_rows(binary, recipients, per_msg, domains, big, flow_rate, policy, sport, stats, tmp):
    rows = []
    relay_policy(policy, sport, max_out=4)
    worker = None
    for count in (recipients, big):
        if not count or (count == big and big == recipients):
            continue
        data = os.path.join(tmp, "backlog-%d" % count)
        up, smtp, grpc = up_ports(binary, data, policy, worker=False)
        try:
            wait_port(smtp, 60)
            time.sleep(1)
            per = per_msg if count == recipients else max(per_msg, 100)
            t0 = time.time()
            g = inject(binary, smtp, count // per, per, domains)
            secs = time.time() - t0
            n = g["recipients"]
            rows.append(("queued %d recipients (%d per message) without a worker" % (n, per),
                         "%.0f s, %.0f rcpt/s, leader RSS %d MB" % (secs, n / secs, rss_mb(data)[0])))
            took, up, smtp, grpc = restart_time(binary, up, data, policy, n)
            rows.append(("restart with %d recipients queued, until the leader answers" % n,
                         "%.2f s, leader RSS %d MB" % (took, rss_mb(data)[0]) if took else "no answer in 600 s"))
            if count != recipients:
                continue
            worker = start_worker(binary, data)
            t0 = time.time()
            ok = wait_recipients(stats, n, 3600)
            st = sink_stats(stats)
            rate = n / max(0.001, st.get("last_ms", 0) / 1000.0 - t0) if ok else 0
            rows.append(("backlog of %d recipients over %d domains drained by the worker" % (n, domains),
                         "%.0f rcpt/s (%.0f%% of flow-through), leader peak RSS %d MB" % (rate, 100 * rate / flow_rate if flow_rate else 0,
                                                                                      rss_mb(data)[1])))
        finally:
            stop(up, worker)
            worker = None
            shutil.rmtree(data, ignore_errors=True)
    return rows


def tarpit_rows(binary, n, tmp):
    """Issue 19: one worker delivering to a fast destination, alone and beside a tarpit that
    answers each final dot after 20 s, with the tarpit's max-smtp-out below and above the
    worker's 100 slots, and with the automatic capacity. The fast destination's rate is
    measured from the start of injection to its last delivery."""
    rows = []
    for label, tarpit_max, capacity in [
        ("fast destination alone, 100 slots", 0, "100"),
        ("beside a tarpit with max-smtp-out 40, 100 slots", 40, "100"),
        ("beside a tarpit with max-smtp-out 150, 100 slots", 150, "100"),
        ("beside a tarpit with max-smtp-out 150, automatic capacity", 150, "0"),
    ]:
        run = tempfile.mkdtemp(dir=tmp)
        fast, fport, fstats = sluice_sink_args(binary, run, [])
        slow, sport, sstats = sluice_sink_args(binary, run, ["--latency-ms", "20000"])
        data = os.path.join(run, "data")
        policy = os.path.join(run, "tarpit.conf")
        with open(policy, "w") as f:
            f.write(f"""run-as-root yes
<virtual-mta v1>
  smtp-source-host 127.0.0.1 bench.example.com
</virtual-mta>
<source 127.0.0.1>
  always-allow-relaying yes
  default-virtual-mta v1
</source>
<domain fast.test>
  route [127.0.0.1]:{fport}
  max-smtp-out 50
  max-msg-per-connection 1000
  use-starttls no
</domain>
<domain tarpit.test>
  route [127.0.0.1]:{sport}
  max-smtp-out {max(1, tarpit_max)}
  max-msg-per-connection 1
  use-starttls no
</domain>
""")
        up, smtp = start_without_worker(binary, data, policy)
        worker = None
        try:
            wait_port(smtp, 60)
            if tarpit_max:
                smtp_source(smtp, tarpit_max + 20, 1024, sessions=10, rcpt="user@tarpit.test")
            worker = start_worker(binary, data, {"SLUICE_WORKER__CAPACITY": capacity})
            # Let the tarpit take what it is given before the fast mail comes.
            deadline = time.time() + 30
            while tarpit_max and time.time() < deadline:
                held = sink_stats(sstats).get("max_concurrent", 0)
                if held >= min(tarpit_max, 75):
                    break
                time.sleep(0.2)
            time.sleep(1)
            t0 = time.time()
            smtp_source(smtp, n, 5120, rcpt="user@fast.test")
            ok = wait_sink(fstats, n, 600)
            st = sink_stats(fstats)
            rate = n / max(0.001, st.get("last_ms", 0) / 1000.0 - t0) if ok else 0
            rows.append((label, sink_stats(sstats).get("max_concurrent", 0), rate))
        finally:
            stop(up, worker, fast, slow)
    return rows


def sluice_sink_args(binary, tmp, extra):
    port = free_port()
    stats = os.path.join(tmp, "sink-%d.json" % port)
    p = subprocess.Popen([binary, "sink", "--listen", "127.0.0.1:%d" % port, "--stats", stats, *extra],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return p, port, stats


def median_run(repeat, run):
    """Runs a row `repeat` times and keeps the run with the median delivered rate: a one-second
    run on a shared two-core machine is noisy, and the ratios are only as good as both rows."""
    runs = [r for r in (run() for _ in range(max(1, repeat))) if r]
    if not runs:
        return None
    runs.sort(key=lambda r: r["delivered"])
    return runs[len(runs) // 2]


def main():
    global SESSIONS
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--sizes", default="5120,102400")
    ap.add_argument("--repeat", type=int, default=3, help="runs per row; the median is reported")
    ap.add_argument("--sessions", type=int, default=SESSIONS,
                    help="concurrent injecting sessions (smtp-source -s, sluice gen -c) for every row")
    ap.add_argument("--accept-only", action="store_true",
                    help="issue 4's table: smtp-source (--sessions) into Postfix and into Sluice (1 controller)")
    ap.add_argument("--worker", action="store_true",
                    help="issue 6's table: one worker delivering queued mail, with and without DKIM and TLS")
    ap.add_argument("--bin", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "debug", "sluice"))
    ap.add_argument("--baseline-bin", help="another sluice build to run the Sluice rows with")
    ap.add_argument("--baseline-name", default="baseline", help="its name in the table")
    ap.add_argument("--base64-rows", action="store_true",
                    help="also run each Sluice row with bodies of random base64 lines, which hardly compress")
    ap.add_argument("--disk-cost", action="store_true",
                    help="also run each Sluice row with its queue on tmpfs (/dev/shm)")
    ap.add_argument("--tls-cost", action="store_true",
                    help="also run the Sluice rows with gRPC in plaintext (`sluice up --plaintext`), to show what mutual TLS costs")
    ap.add_argument("--tarpit", action="store_true",
                    help="one worker, a fast destination beside a tarpit (issue 19)")
    ap.add_argument("--backlog", type=int, metavar="RECIPIENTS",
                    help="issue 18: drain a backlog of this many 1 KB recipients over --domains domains, against flow-through")
    ap.add_argument("--domains", type=int, default=1000)
    ap.add_argument("--per-message", type=int, default=10, help="recipients per message in --backlog")
    ap.add_argument("--flow", type=int, default=200000, help="recipients for the flow-through row of --backlog")
    ap.add_argument("--restart-at", type=int, default=0, help="also queue this many recipients and time a restart")
    a = ap.parse_args()
    SESSIONS = a.sessions
    if a.backlog:
        with tempfile.TemporaryDirectory() as tmp:
            rows = backlog_rows(a.bin, a.backlog, a.per_message, a.domains, a.flow, a.restart_at, tmp)
        print("| row | result |")
        print("|---|---|")
        for name, r in rows:
            print("| %s | %s |" % (name, r))
        return
    if a.tarpit:
        with tempfile.TemporaryDirectory() as tmp:
            rows = tarpit_rows(a.bin, a.messages, tmp)
        alone = rows[0][2]
        print("| setup (5 KB messages) | tarpit connections held | fast destination msg/s | vs alone |")
        print("|---|---|---|---|")
        for name, held, rate in rows:
            print("| %s | %s | %.0f | %.0f%% |" % (name, held if "alone" not in name else "-", rate, 100 * rate / alone if alone else 0))
        return
    if a.worker:
        print("| size | msgs | setup | delivered msg/s | vs one hop | vs Postfix (same DKIM) |")
        print("|---|---|---|---|---|---|")
        for size in [int(s) for s in a.sizes.split(",")]:
            n = a.messages if size <= 10240 else max(500, a.messages // 5)
            with tempfile.TemporaryDirectory() as tmp:
                rows = worker_rows(a.bin, n, size, tmp, a.baseline_bin, a.baseline_name)
            hop = rows[0][1]
            for name, rate, pf in rows:
                if name.startswith("one hop"):
                    hop = rate
                elif name.startswith("flow-through"):
                    hop = rows[0][1]  # smtp-source in clear, as in the flow-through rows
                print("| %d KB | %d | %s | %.0f | %.0f%% | %s |" % (size // 1024, n, name, rate, 100 * rate / hop if hop else 0,
                                                               "%.2fx" % (rate / pf) if pf else "-"))
        return
    if a.accept_only:
        print("| size | msgs | setup | accepted msg/s (smtp-source, %d sessions) | vs Postfix |" % SESSIONS)
        print("|---|---|---|---|---|")
        for size in [int(s) for s in a.sizes.split(",")]:
            n = a.messages if size <= 10240 else max(500, a.messages // 5)
            with tempfile.TemporaryDirectory() as tmp:
                pf = postfix(a.bin, n, size, tmp)
                sl = sluice(a.bin, 1, n, size, tmp, injector="smtp-source")
            base = pf["accepted"] if pf else 0
            print("| %d KB | %d | Postfix, queue on disk | %s | 1.00x |" % (size // 1024, n, "%.0f" % base if pf else "n/a"))
            if sl:
                print("| %d KB | %d | Sluice ingress, 1 controller | %.0f | %s |" % (size // 1024, n, sl["accepted"], "%.2fx" % (sl["accepted"] / base) if base else "-"))
        return
    rows = []
    for size in [int(s) for s in a.sizes.split(",")]:
        n = a.messages if size <= 10240 else max(500, a.messages // 5)
        with tempfile.TemporaryDirectory() as tmp:
            res = {"one hop (smtp-source -> smtp-sink)": median_run(a.repeat, lambda: one_hop(n, size))}
            res["Postfix relaying to the sink"] = median_run(a.repeat, lambda: postfix(a.bin, n, size, tmp))
            for nodes in (1, 3):
                name = "Sluice, %d controller%s" % (nodes, "s" if nodes > 1 else "")
                res[name] = median_run(a.repeat, lambda: sluice(a.bin, nodes, n, size, tmp))
                if a.tls_cost:
                    res["%s, gRPC in plaintext" % name] = median_run(
                        a.repeat, lambda: sluice(a.bin, nodes, n, size, tmp, plaintext=True))
                if a.base64_rows:
                    res["%s, base64 bodies" % name] = median_run(
                        a.repeat, lambda: sluice(a.bin, nodes, n, size, tmp, base64_body=True))
                if a.disk_cost:
                    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
                        res["%s, queue on tmpfs" % name] = median_run(
                            a.repeat, lambda: sluice(a.bin, nodes, n, size, shm))
                if a.baseline_bin:
                    res["%s (%s)" % (name, a.baseline_name)] = median_run(
                        a.repeat, lambda: sluice(a.baseline_bin, nodes, n, size, tmp))
                    if a.base64_rows:
                        res["%s, base64 bodies (%s)" % (name, a.baseline_name)] = median_run(
                            a.repeat, lambda: sluice(a.baseline_bin, nodes, n, size, tmp, base64_body=True))
        pf = (res.get("Postfix relaying to the sink") or {}).get("delivered") or 0
        hop = res["one hop (smtp-source -> smtp-sink)"]["delivered"]
        for name, r in res.items():
            rows.append((size, n, name, r, pf, hop))
    print("| size | msgs | setup | accepted msg/s | delivered msg/s | p50 / p99 inject->sink (ms) | peak RSS | vs Postfix | vs one hop |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size, n, name, r, pf, hop in rows:
        if r is None:
            print("| %d KB | %d | %s | not available | | | | | |" % (size // 1024, n, name))
            continue
        lat = "%d / %d" % (r["p50"], r["p99"]) if r["p50"] is not None else "-"
        vs_pf = "%.2fx" % (r["delivered"] / pf) if pf else "-"
        vs_hop = "%.0f%%" % (100 * r["delivered"] / hop) if hop else "-"
        print("| %d KB | %d | %s | %.0f | %.0f | %s | %s | %s | %s |" % (size // 1024, n, name, r["accepted"], r["delivered"], lat, r["rss"], vs_pf, vs_hop))


if __name__ == "__main__":
    main()
