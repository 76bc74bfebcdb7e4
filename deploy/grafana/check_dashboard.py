#!/usr/bin/env python3
"""Check a Grafana dashboard's PromQL against the list of metrics Sluice exports.

Usage: check_dashboard.py DASHBOARD.json METRIC_NAMES.txt

METRIC_NAMES.txt holds one base metric name per line (blank lines and lines
starting with '#' are ignored). A counter is listed without its `_total`
suffix and a histogram without `_bucket`/`_sum`/`_count`.

Exits 1 if any `sluice_*` identifier in a panel `expr` has a base name that is
not listed, if two panels share an id, or if the dashboard has no `panels`.
"""
import json
import re
import sys

SUFFIXES = ("_total", "_bucket", "_sum", "_count")
IDENT = re.compile(r"(?<![A-Za-z0-9_:])sluice_[A-Za-z0-9_:]*")


def base_name(name):
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def walk_panels(panels):
    """Yield every panel, including those nested in (collapsed) rows."""
    for panel in panels:
        if not isinstance(panel, dict):
            continue
        yield panel
        yield from walk_panels(panel.get("panels") or [])


def main(argv):
    if len(argv) != 3:
        print(f"usage: {argv[0]} DASHBOARD.json METRIC_NAMES.txt", file=sys.stderr)
        return 2
    try:
        with open(argv[1], encoding="utf-8") as f:
            dash = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        print(f"error: cannot load dashboard {argv[1]}: {e}", file=sys.stderr)
        return 1
    try:
        with open(argv[2], encoding="utf-8") as f:
            known = {
                line.strip()
                for line in f
                if line.strip() and not line.lstrip().startswith("#")
            }
    except OSError as e:
        print(f"error: cannot read metric list {argv[2]}: {e}", file=sys.stderr)
        return 1

    errors = []
    if not isinstance(dash, dict) or not isinstance(dash.get("panels"), list) or not dash["panels"]:
        print("error: dashboard has no 'panels'", file=sys.stderr)
        return 1

    seen_ids = {}
    used = set()
    n_panels = 0
    for panel in walk_panels(dash["panels"]):
        n_panels += 1
        title = panel.get("title", "<untitled>")
        pid = panel.get("id")
        if pid is None:
            errors.append(f"panel {title!r} has no id")
        elif pid in seen_ids:
            errors.append(f"duplicate panel id {pid}: {seen_ids[pid]!r} and {title!r}")
        else:
            seen_ids[pid] = title
        for target in panel.get("targets") or []:
            expr = target.get("expr") if isinstance(target, dict) else None
            if not expr:
                continue
            for ident in IDENT.findall(expr):
                used.add(ident)
                if base_name(ident) not in known:
                    errors.append(
                        f"panel {pid} {title!r}: unknown metric {ident}"
                        f" (base {base_name(ident)})"
                    )

    if errors:
        for err in errors:
            print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        f"ok: {n_panels} panels, {len(used)} metric names "
        f"({len({base_name(u) for u in used})} base names) checked"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
