#!/usr/bin/env bash
# Checks the deployment files without deploying anything:
#  - each systemd unit passes `systemd-analyze verify` (with ExecStart pointed at the binary
#    given, since verify fails on a missing one; any message counts as a failure, because verify
#    exits 0 on unknown keys and bad values) and carries its hardening;
#  - the example settings files use only keys documented in docs/settings.md;
#  - the Kubernetes policy passes `sluice config check`;
#  - every manifest rendered from the kustomize base, and from the example overlay with Secrets
#    made by its make-secrets.sh, validates strictly (unknown fields fail) against the schemas
#    of a fixed Kubernetes version with kubernetes-validate (PyPI, installed in a venv);
#  - every pod turns Kubernetes' service-link variables off (SLUICE_* variables are settings).
#
#   deploy/verify.sh PATH_TO_SLUICE_BINARY
#
# Exits non-zero when any check fails.
set -euo pipefail

K8S_VERSION=1.30.0
VALIDATE_VERSION=1.37.0

if [[ $# -ne 1 || ! -x $1 ]]; then
    echo "usage: $0 PATH_TO_SLUICE_BINARY (an executable sluice)" >&2
    exit 2
fi
sluice=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

passed=0
failed=0
# check NAME COMMAND...: runs the command; a failure prints its output.
check() {
    local name=$1
    shift
    local out
    if out=$("$@" 2>&1); then
        echo "ok    $name"
        passed=$((passed + 1))
    else
        echo "FAIL  $name"
        [[ -z $out ]] || printf '%s\n' "$out" | sed 's/^/      /'
        failed=$((failed + 1))
    fi
}

# --- systemd units ----------------------------------------------------------------------------
for tool in systemd-analyze python3 kubectl; do
    command -v "$tool" >/dev/null || { echo "FAIL  $tool is not installed" >&2; exit 1; }
done

mkdir -p "$tmp/units"
for f in deploy/systemd/*.service; do
    sed "s#^ExecStart=/usr/local/bin/sluice #ExecStart=$sluice #" "$f" >"$tmp/units/$(basename "$f")"
done
# systemd-analyze verify exits 0 on unknown keys and unparsable values: any output fails.
verify_unit() {
    local out
    out=$(cd "$tmp/units" && systemd-analyze verify "./$1" 2>&1) || { printf '%s\n' "$out"; return 1; }
    [[ -z $out ]] || { printf '%s\n' "$out"; return 1; }
}
for f in "$tmp"/units/*.service; do
    unit=$(basename "$f")
    # A template is verified as an instance, so that %i is expanded.
    [[ $unit == *@.service ]] && unit=${unit%@.service}@pool-a.service
    check "systemd-analyze verify $unit" verify_unit "$unit"
done

# has_lines FILE LINE...: every LINE is a line of FILE.
has_lines() {
    local f=$1 l
    shift
    for l in "$@"; do
        grep -qxF -- "$l" "$f" || { echo "$f lacks: $l"; return 1; }
    done
}
common=(Type=exec User=sluice Group=sluice NoNewPrivileges=yes ProtectSystem=strict ProtectHome=yes
    PrivateTmp=yes ReadWritePaths=/var/lib/sluice StateDirectory=sluice Restart=on-failure)
for f in deploy/systemd/*.service; do
    extra=(CapabilityBoundingSet= AmbientCapabilities=)
    case $f in
        *ingress*) extra=(AmbientCapabilities=CAP_NET_BIND_SERVICE CapabilityBoundingSet=CAP_NET_BIND_SERVICE LimitNOFILE=65536) ;;
        *worker*) extra+=(LimitNOFILE=65536) ;;
    esac
    check "hardening of $(basename "$f")" has_lines "$f" "${common[@]}" "${extra[@]}"
done

# --- settings and policy ----------------------------------------------------------------------
# No sluice subcommand reads a settings file without starting a node, so the keys are checked
# against the table of docs/settings.md (the loader refuses unknown keys).
settings_keys() {
    python3 - "$@" <<'PY'
import re, sys, tomllib
doc = open("docs/settings.md").read()
known = set()
for line in doc.splitlines():
    if line.startswith("| `"):
        known.update(re.findall(r"`([a-z_.]+)`", line.split("|")[1]))
bad = []
def walk(prefix, table, path):
    for k, v in table.items():
        key = prefix + k
        if isinstance(v, dict):
            walk(key + ".", v, path)
        elif key not in known:
            bad.append(f"{path}: `{key}` is not a key of docs/settings.md")
for path in sys.argv[1:]:
    with open(path, "rb") as f:
        try:
            walk("", tomllib.load(f), path)
        except tomllib.TOMLDecodeError as e:
            bad.append(f"{path}: {e}")
print("\n".join(bad))
sys.exit(1 if bad else 0)
PY
}
for f in deploy/systemd/*.toml deploy/k8s/base/*.toml; do
    check "settings keys of $f" settings_keys "$f"
done
check "sluice config check deploy/k8s/base/sluice.conf" \
    "$sluice" config check --skip-files deploy/k8s/base/sluice.conf

# --- Kubernetes -------------------------------------------------------------------------------
venv=${XDG_CACHE_HOME:-$HOME/.cache}/sluice-venv
if ! "$venv/bin/kubernetes-validate" --version 2>/dev/null | grep -qxF "$VALIDATE_VERSION"; then
    echo "installing kubernetes-validate $VALIDATE_VERSION in $venv"
    [[ -x $venv/bin/pip ]] || python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==$VALIDATE_VERSION"
fi
validate() {
    "$venv/bin/kubernetes-validate" --strict --quiet -k "$K8S_VERSION" "$1"
}
# Every pod of the rendered manifests sets enableServiceLinks: false.
no_service_links() {
    "$venv/bin/python" - "$1" <<'PY'
import sys, yaml
bad = []
for doc in yaml.safe_load_all(open(sys.argv[1])):
    if not doc or doc.get("kind") not in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        continue
    spec = doc["spec"]["template"]["spec"]
    if spec.get("enableServiceLinks") is not False:
        bad.append(f"{doc['kind']}/{doc['metadata']['name']}: enableServiceLinks is not false")
print("\n".join(bad))
sys.exit(1 if bad else 0)
PY
}
render() {
    kubectl kustomize "$1" >"$2"
}
check "kubectl kustomize deploy/k8s/base" render deploy/k8s/base "$tmp/base.yaml"
if [[ -s $tmp/base.yaml ]]; then
    check "kubernetes-validate --strict -k $K8S_VERSION (base: $(grep -c '^kind:' "$tmp/base.yaml") resources)" \
        validate "$tmp/base.yaml"
    check "every pod of the base has enableServiceLinks: false" no_service_links "$tmp/base.yaml"
fi

# The example overlay needs the files make-secrets.sh writes: make them in a copy.
cp -r deploy/k8s "$tmp/k8s"
rm -rf "$tmp/k8s/overlays/example/ca" "$tmp/k8s/overlays/example/secrets"
check "make-secrets.sh (sluice cert, sluice config dkim-keys)" \
    "$tmp/k8s/overlays/example/make-secrets.sh" "$sluice" sluice
check "kubectl kustomize deploy/k8s/overlays/example" \
    render "$tmp/k8s/overlays/example" "$tmp/overlay.yaml"
if [[ -s $tmp/overlay.yaml ]]; then
    check "kubernetes-validate --strict -k $K8S_VERSION (overlay: $(grep -c '^kind:' "$tmp/overlay.yaml") resources)" \
        validate "$tmp/overlay.yaml"
    check "the overlay replaces every placeholder Secret" \
        bash -c "! grep -n REPLACE '$tmp/overlay.yaml'"
fi

echo "deploy/verify.sh: $passed passed, $failed failed"
((failed == 0))
