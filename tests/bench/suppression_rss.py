#!/usr/bin/python3
"""Memory of a one-host cluster (`sluice up`, loopback only) with an empty suppression list
and with N entries imported, measured in the same run. Prints a markdown table: the
controller (the leader, which keeps the list in RocksDB) and the ingress node (which holds a
hashed copy to check RCPT), current RSS and peak RSS, and the ratio to the empty list.

Usage: tests/bench/suppression_rss.py [--entries 1000000] [--bin PATH]"""
import argparse
import os
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import free_port, node_memory, wait_port  # noqa: E402


def rss(data_dir):
    """{role: (VmRSS MB, VmHWM MB)} of the controller and ingress started for `data_dir`."""
    return {role: (r, h) for role, r, h in node_memory(data_dir) if role in ("controller", "ingress")}


def refused(port, address):
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            s.ehlo("bench.example.com")
            s.mail("s@example.com")
            code, _ = s.rcpt(address)
            return code == 550
    except (OSError, smtplib.SMTPException):
        return False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--bin", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "debug", "sluice"))
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="sluice-suppress-rss-")
    data = os.path.join(tmp, "data")
    policy = os.path.join(tmp, "policy.conf")
    with open(policy, "w") as f:
        f.write("run-as-root yes\n<virtual-mta v1>\n smtp-source-host 127.0.0.1 bench.example.com\n</virtual-mta>\n"
                "<source 127.0.0.1>\n always-allow-relaying yes\n default-virtual-mta v1\n</source>\n"
                "<domain *>\n route [127.0.0.1]:9\n</domain>\n")
    smtp, http, grpc = free_port(), free_port(), free_port()

    def start():
        return subprocess.Popen([a.bin, "up", "--no-sink", "--no-worker", "--data-dir", data, "--policy", policy,
                                 "--smtp-port", str(smtp), "--http-port", str(http), "--grpc-port", str(grpc)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(p):
        p.send_signal(signal.SIGINT)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    up = start()
    try:
        if not wait_port(smtp, 120):
            sys.exit("sluice up did not listen")
        time.sleep(3)
        empty = rss(data)
        csv = os.path.join(tmp, "list.csv")
        with open(csv, "w") as f:
            f.write("address,scope,reason,source,time,expires\n")
            for i in range(a.entries):
                f.write("user%d@d%d.example.com,,operator,bench,,\n" % (i, i % 1000))
        env = dict(os.environ, SLUICE_TLS_DIR=os.path.join(data, "tls"))
        t0 = time.time()
        r = subprocess.run([a.bin, "suppress", "import", csv, "-c", "127.0.0.1:%d" % grpc],
                           capture_output=True, text=True, env=env)
        if r.returncode != 0:
            sys.exit("import failed: %s" % r.stderr)
        imported = time.time() - t0
        last = "user%d@d%d.example.com" % (a.entries - 1, (a.entries - 1) % 1000)
        end = time.time() + 600
        while not refused(smtp, last):
            if time.time() > end:
                sys.exit("ingress did not load the list")
            time.sleep(0.5)
        loaded = time.time() - t0
        time.sleep(2)
        full = rss(data)
        # Started again: RocksDB's memtables, filled by the import, start empty; what is left
        # is what holding the list costs.
        stop(up)
        t1 = time.time()
        up = start()
        if not wait_port(smtp, 120):
            sys.exit("sluice up did not listen after the restart")
        end = time.time() + 600
        while not refused(smtp, last):
            if time.time() > end:
                sys.exit("ingress did not load the list after the restart")
            time.sleep(0.5)
        reloaded = time.time() - t1
        time.sleep(2)
        again = rss(data)
        print("%d entries: imported in %.1f s, refused at ingress RCPT %.1f s after the import began; "
              "after a restart, refused again %.1f s after the start\n" % (a.entries, imported, loaded, reloaded))
        print("| process | RSS, empty list | RSS, %d entries just imported | RSS, restarted with them | ratio (restarted / empty) |"
              % a.entries)
        print("|---|---|---|---|---|")
        for role in ("controller", "ingress"):
            e, f_, g = empty.get(role, (0, 0))[0], full.get(role, (0, 0))[0], again.get(role, (0, 0))[0]
            print("| %s | %d MB | %d MB | %d MB | %.2f |" % (role, e, f_, g, g / max(e, 1)))
    finally:
        stop(up)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
