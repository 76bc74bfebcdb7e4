#!/usr/bin/env bash
# Fills secrets/ beside this script with what the base's placeholder Secrets stand for:
# the cluster CA and every node's certificate (`sluice cert`), the DKIM key the policy names
# (`sluice config dkim-keys`), a self-signed STARTTLS certificate (openssl; replace it with one
# from a CA your clients trust) and an empty HTTP users file. Files that exist are kept.
#
#   deploy/k8s/overlays/example/make-secrets.sh [SLUICE_BINARY] [NAMESPACE]
#   kubectl apply -k deploy/k8s/overlays/example
#
# The CA's key stays in ca/ beside this script, outside every Secret: keep it offline.
# The controllers' certificates name the namespace (default: sluice, as in the base).
set -euo pipefail
sluice=${1:-sluice}
ns=${2:-sluice}
here=$(cd "$(dirname "$0")" && pwd)
ca=$here/ca
out=$here/secrets

[[ -f $ca/ca.pem ]] || "$sluice" cert init --dir "$ca"

# issue SECRET ROLE NAME [SAN...]: a certificate into secrets/SECRET, beside a copy of ca.pem.
issue() {
    local dir=$out/$1 role=$2 name=$3
    shift 3
    mkdir -p "$dir"
    cp "$ca/ca.pem" "$dir/ca.pem"
    [[ -f $dir/$role-$name.pem ]] && return
    local sans=()
    for s in "$@"; do sans+=(--san "$s"); done
    "$sluice" cert issue --dir "$ca" --out "$dir" --role "$role" --name "$name" "${sans[@]}" >/dev/null
    echo "issued $dir/$role-$name.pem"
}

# Controller N is pod sluice-controller-(N-1); 127.0.0.1 for the readiness probe in the pod.
for n in 1 2 3; do
    issue controller controller "$n" "sluice-controller-$((n - 1)).sluice-controller.$ns.svc" 127.0.0.1
done
issue controller viewer probe
issue ingress ingress k8s
# The worker's name and its source IPs, as in worker-pool-a.toml.
issue worker-pool-a worker pool-a 192.0.2.10 192.0.2.11
issue operator operator admin

mkdir -p "$out/dkim"
if [[ ! -f $out/dkim/example.com.sluice.pem ]]; then
    policy=$(mktemp)
    trap 'rm -f "$policy"' EXIT
    echo "domain-key sluice,example.com,$out/dkim/example.com.sluice.pem" >"$policy"
    "$sluice" config dkim-keys "$policy"
fi

mkdir -p "$out/smtp-tls"
if [[ ! -f $out/smtp-tls/tls.crt ]]; then
    openssl req -x509 -newkey rsa:2048 -nodes -days 825 -subj "/CN=mta.example.com" \
        -addext "subjectAltName=DNS:mta.example.com" \
        -keyout "$out/smtp-tls/tls.key" -out "$out/smtp-tls/tls.crt" 2>/dev/null
    chmod 600 "$out/smtp-tls/tls.key"
    echo "made a self-signed STARTTLS certificate in $out/smtp-tls"
fi

mkdir -p "$out/http-users"
# One `NAME ARGON2-HASH` line per user: echo 'password' | sluice config hash-password
[[ -f $out/http-users/users ]] || : >"$out/http-users/users"
echo "secrets ready in $out"
