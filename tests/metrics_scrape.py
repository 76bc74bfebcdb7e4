#!/usr/bin/python3
"""Scrapes Sluice /metrics URLs and parses them with the Prometheus project's own client
(python3-prometheus-client, its strict OpenMetrics parser). Prints one JSON object: for each
URL, a list of samples {name, labels, value}, and under "families" every metric family's name. Exits 1 with the parser's error on bad output."""
import json
import sys
import urllib.request

from prometheus_client.openmetrics.parser import text_string_to_metric_families

out = {}
names = set()
for url in sys.argv[1:]:
    with urllib.request.urlopen(url, timeout=10) as r:
        ctype = r.headers.get("content-type", "")
        text = r.read().decode("utf-8")
    if not ctype.startswith("application/openmetrics-text"):
        sys.exit(f"{url}: content-type {ctype!r} is not OpenMetrics")
    try:
        families = list(text_string_to_metric_families(text))
    except Exception as e:  # the parser raises ValueError and others
        sys.exit(f"{url}: does not parse: {e}\n{text}")
    names.update(f.name for f in families)
    out[url] = [
        {"name": s.name, "labels": s.labels, "value": s.value}
        for f in families
        for s in f.samples
    ]
out["families"] = sorted(names)
print(json.dumps(out))
