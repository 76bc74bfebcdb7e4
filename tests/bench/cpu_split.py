#!/usr/bin/python3
"""Where the CPU goes: cpu_split.py BIN CONTROLLERS MESSAGES SIZE [follower|leader|ingress|worker PERF_DATA]
Starts a sink and `sluice up` (as bench.py does), warms up with 500 messages, then injects
MESSAGES with 50 connections (SESSIONS=N in the environment for N), waits until the sink has
them all and prints the CPU seconds each process used for them. With `follower` or `leader`,
that controller is recorded with `perf record --call-graph dwarf` into PERF_DATA for the same
span (the leader is the controller that used the most CPU during the warm-up); `ingress` or
`worker` records that process. With KEEP_DATA=1
in the environment the folder (each node's log and RocksDB LOG) is kept and its path printed.
With THREADS=1 each controller's CPU is also split by thread name (tokio's workers, RocksDB's
flush and compaction threads). With BASE64_BODY=1 the bodies are random base64 lines
(`sluice gen --base64-body`), which hardly compress."""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench

bench.SESSIONS = int(os.environ.get("SESSIONS", bench.SESSIONS))
base64_body = os.environ.get("BASE64_BODY") == "1"
threads = os.environ.get("THREADS") == "1"

binary, ctl, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rec = sys.argv[5] if len(sys.argv) > 5 else None
perf_data = sys.argv[6] if len(sys.argv) > 6 else "perf.data"
tck = os.sysconf("SC_CLK_TCK")
tmp = tempfile.mkdtemp()

def cpu_seconds(pid):
    """User and system CPU seconds of a process so far."""
    st = open("/proc/%s/stat" % pid).read().rsplit(")", 1)[1].split()
    return (int(st[11]) + int(st[12])) / tck


def thread_seconds(pid):
    """CPU seconds by thread name within a process (threads that ended are not counted)."""
    out = {}
    for tid in os.listdir("/proc/%s/task" % pid):
        try:
            name = open("/proc/%s/task/%s/comm" % (pid, tid)).read().strip()
            out[name] = out.get(name, 0) + cpu_seconds("%s/task/%s" % (pid, tid))
        except (OSError, ValueError, IndexError):
            pass
    return out


def procs(data):
    """(pid, role, CPU seconds) of each process `sluice up` started with `data`."""
    out = []
    for pid, role in bench.node_processes(data):
        if role == "up":
            continue
        try:
            out.append((int(pid), role, cpu_seconds(pid)))
        except (OSError, ValueError, IndexError):
            pass
    return out


sink, sport, stats = bench.sluice_sink(binary, tmp)
data = os.path.join(tmp, "data")
policy = os.path.join(tmp, "p.conf")
bench.relay_policy(policy, sport, received=True)
up, smtp = bench.start_up(binary, ctl, data, policy)
perf = None
try:
    assert bench.wait_port(smtp, 60)
    time.sleep(1)
    w = bench.gen(binary, smtp, 500, size, base64_body)
    assert bench.wait_sink(stats, w["accepted"], 120)
    time.sleep(1)
    before = {p: (role, c) for p, role, c in procs(data)}
    s0 = cpu_seconds(sink.pid)
    t_before = {p: thread_seconds(p) for p, (role, _) in before.items() if threads and role == "controller"}
    ctls = sorted([(c, p) for p, (role, c) in before.items() if role == "controller"])
    pid = None
    if rec in ("ingress", "worker"):
        pid = next(p for p, (role, _) in before.items() if role == rec)
    elif rec and ctls:
        pid = ctls[-1][1] if rec == "leader" or len(ctls) == 1 else ctls[0][1]
    if pid:
        perf = subprocess.Popen(["perf", "record", "-q", "--call-graph", "dwarf,16384", "-F", "400", "-p", str(pid),
                                 "-o", perf_data], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1)
    t0 = time.time()
    s = bench.gen(binary, smtp, n, size, base64_body)
    t1 = time.time()
    assert bench.wait_sink(stats, w["accepted"] + s["accepted"], 600)
    if perf:
        perf.send_signal(signal.SIGINT)
        perf.wait()
    after = procs(data)
    t_after = {p: thread_seconds(p) for p in t_before}
    # The sink writes its stats once a second; the time of its last message is exact.
    last = bench.sink_stats(stats).get("last_ms", 0) / 1000.0
    print("accepted %d in %.2f s (%.0f/s), delivered by %.2f s (%.0f/s)" % (
        s["accepted"], t1 - t0, s["accepted"] / (t1 - t0), last - t0, s["accepted"] / max(0.001, last - t0)))
    tot = 0
    for p, role, c in sorted(after, key=lambda x: x[1]):
        d = c - before.get(p, (role, 0))[1]
        tot += d
        print("%-10s pid %-7d cpu %.2f s" % (role, p, d))
        if p in t_after:
            split = {k: v - t_before[p].get(k, 0) for k, v in t_after[p].items()}
            print("    " + ", ".join("%s %.2f s" % (k, v) for k, v in sorted(split.items(), key=lambda kv: -kv[1]) if v >= 0.01))
    sink_cpu = cpu_seconds(sink.pid) - s0
    print("sink       cpu %.2f s; total excl. gen %.2f s" % (sink_cpu, tot + sink_cpu))
finally:
    bench.stop(up, None, sink)
    if os.environ.get("KEEP_DATA"):
        print("kept", tmp)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
