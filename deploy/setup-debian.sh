#!/usr/bin/env bash
# Installs the Debian packages Sluice needs: libclang-dev for RocksDB's bindings, and the real
# third-party clients the tests talk to. Runs apt only for what is missing.
set -euo pipefail
need=()
dpkg -s libclang-dev >/dev/null 2>&1 || need+=(libclang-dev)
if [[ "${1:-}" == "--tests" ]]; then
    for p in swaks postfix python3-dkim python3-dnspython python3-nacl python3-prometheus-client python3-venv chromium haproxy dnsmasq-base openssl curl iproute2 systemd; do
        dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
    done
fi
# kubectl (for `kubectl kustomize` in deploy/verify.sh) is not packaged by Debian; the test
# that needs it says so when it is missing.
if ((${#need[@]})); then
    sudo=""
    [[ $(id -u) -eq 0 ]] || sudo="sudo"
    echo "installing: ${need[*]}"
    # Postfix is only used as a client (smtp-source, smtp-sink) and a local benchmark baseline.
    echo "postfix postfix/main_mailer_type select No configuration" | $sudo debconf-set-selections
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
