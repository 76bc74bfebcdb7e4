#!/usr/bin/env bash
# A multi-host Sluice cluster in network namespaces on one machine, for tests and for operators
# who want to see the cluster behave as a cluster: kill a host, cut a link, add a controller.
#
#   deploy/testbed/testbed.sh up          make the hosts and start every process
#   deploy/testbed/testbed.sh down        stop every process and remove every namespace
#   deploy/testbed/testbed.sh kill HOST   kill -9 every process of HOST
#   deploy/testbed/testbed.sh start HOST  start HOST's processes again
#   deploy/testbed/testbed.sh link HOST down|up
#   deploy/testbed/testbed.sh takeover     move w1's source IPs to w3 and start its worker there
#   deploy/testbed/testbed.sh exec HOST CMD...   run CMD on HOST (ops: the operator's host)
#
# Environment: TESTBED_DIR (state, default ./testbed), TESTBED_PREFIX (namespace prefix, default
# sltb), SLUICE (the binary, default `sluice` on PATH), TESTBED_LEASE_TTL_MS (default 30000).
#
# Network safety: every address is from 198.18.0.0/15 (RFC 2544, set aside for benchmarks) and
# exists only inside the namespaces made here. The hosts are joined by a bridge that lives in its
# own namespace, so nothing is added to the machine's own network and no namespace has a route
# beyond 198.18.0.0/15. Needs root, ip(8), haproxy and dnsmasq.
#
# Hosts: lb (haproxy, TCP, in front of in1 and in2), in1 and in2 (ingress), c1-c3 (controllers;
# c4 is made but started only on `start c4`), w1 (pool-a: 198.18.1.1-2), w2 (pool-b:
# 198.18.2.1-2), w3 (a standby for pool-a: `takeover` moves w1's IPs to it), rx (dnsmasq
# with MX records for a.test, b.test and c.test, a sink that records each connection's source
# IP, a slow one on port 2526 for slow.test and one on 2527 for shared.test), ops (the
# operator's CLI).
set -Eeuo pipefail

DIR=${TESTBED_DIR:-./testbed}
P=${TESTBED_PREFIX:-sltb}
SLUICE=${SLUICE:-sluice}
LEASE_TTL_MS=${TESTBED_LEASE_TTL_MS:-30000}

declare -A IP=(
    [lb]=198.18.0.2 [in1]=198.18.0.11 [in2]=198.18.0.12
    [c1]=198.18.0.21 [c2]=198.18.0.22 [c3]=198.18.0.23 [c4]=198.18.0.24
    [w1]=198.18.0.31 [w2]=198.18.0.32 [w3]=198.18.0.33 [rx]=198.18.0.40 [ops]=198.18.0.50
)
declare -A EXTRA=([w1]="198.18.1.1 198.18.1.2" [w2]="198.18.2.1 198.18.2.2")
HOSTS=(lb in1 in2 c1 c2 c3 c4 w1 w2 w3 rx ops)
CONTROLLERS='["198.18.0.21:7400", "198.18.0.22:7400", "198.18.0.23:7400"]'

ns() { echo "$P-$1"; }
on() { local h=$1; shift; ip netns exec "$(ns "$h")" "$@"; }
tls() { echo "[tls]
ca = \"$DIR/tls/ca.pem\"
cert = \"$DIR/tls/$1.pem\"
key = \"$DIR/tls/$1.key\""; }

# Starts CMD on HOST in the background, its output in DIR/logs/HOST-NAME.log.
bg() {
    local h=$1 name=$2
    shift 2
    # exec: no shell stays behind that could run `up`'s ERR trap when the process dies.
    (
        trap - ERR
        exec ip netns exec "$(ns "$h")" setsid "$@"
    ) >>"$DIR/logs/$h-$name.log" 2>&1 </dev/null &
}

make_net() {
    local sw
    sw=$(ns sw)
    ip netns add "$sw"
    ip -n "$sw" link set lo up
    ip -n "$sw" link add br0 type bridge
    ip -n "$sw" link set br0 up
    for h in "${HOSTS[@]}"; do
        ip netns add "$(ns "$h")"
        ip -n "$(ns "$h")" link set lo up
        ip -n "$sw" link add "$h" type veth peer name eth0 netns "$(ns "$h")"
        ip -n "$sw" link set "$h" master br0 up
        ip -n "$(ns "$h")" addr add "${IP[$h]}/15" dev eth0
        for a in ${EXTRA[$h]:-}; do
            ip -n "$(ns "$h")" addr add "$a/15" dev eth0
        done
        ip -n "$(ns "$h")" link set eth0 up
    done
}

make_certs() {
    local t=$DIR/tls
    "$SLUICE" cert init --dir "$t" >/dev/null
    for i in 1 2 3 4; do
        "$SLUICE" cert issue --dir "$t" --role controller --name "$i" --san "198.18.0.2$i" >/dev/null
    done
    for h in in1 in2; do
        "$SLUICE" cert issue --dir "$t" --role ingress --name "$h" >/dev/null
    done
    "$SLUICE" cert issue --dir "$t" --role worker --name w1 --san 198.18.1.1 --san 198.18.1.2 >/dev/null
    "$SLUICE" cert issue --dir "$t" --role worker --name w2 --san 198.18.2.1 --san 198.18.2.2 >/dev/null
    "$SLUICE" cert issue --dir "$t" --role worker --name w3 --san 198.18.1.1 --san 198.18.1.2 >/dev/null
    "$SLUICE" cert issue --dir "$t" --role operator --name admin >/dev/null
}

write_files() {
    cat >"$DIR/policy.conf" <<POLICY
run-as-root yes
host-name sluice.example.com
postmaster postmaster@example.com
total-max-smtp-in 1000
<source 198.18.0.0/15>
    smtp-service yes
    always-allow-relaying yes
    process-x-virtual-mta yes
    default-virtual-mta pool-a
</source>
<virtual-mta a1>
    smtp-source-host 198.18.1.1 a1.example.com
</virtual-mta>
<virtual-mta a2>
    smtp-source-host 198.18.1.2 a2.example.com
</virtual-mta>
<virtual-mta b1>
    smtp-source-host 198.18.2.1 b1.example.com
</virtual-mta>
<virtual-mta b2>
    smtp-source-host 198.18.2.2 b2.example.com
</virtual-mta>
# No source IP of its own: any worker sends it, so one queue (and one budget) spans hosts.
<virtual-mta shared>
</virtual-mta>
<virtual-mta-pool pool-a>
    virtual-mta a1
    virtual-mta a2
</virtual-mta-pool>
<virtual-mta-pool pool-b>
    virtual-mta b1
    virtual-mta b2
</virtual-mta-pool>
<domain *>
    max-smtp-out 20
    retry-after 2s
    use-starttls no
</domain>
<domain slow.test>
    route [198.18.0.40]:2526
    retry-after 2s
    use-starttls no
</domain>
<domain shared.test>
    route [198.18.0.40]:2527
    max-smtp-out 2
    max-msg-rate 30/10s
    max-msg-per-connection 2
    retry-after 2s
    use-starttls no
</domain>
<domain c.test>
    max-smtp-out 2
    max-msg-rate 30/10s
    retry-after 2s
    use-starttls no
</domain>
<acct-file acct.csv>
    records d,b,t
</acct-file>
POLICY
    for i in 1 2 3 4; do
        cat >"$DIR/c$i.toml" <<S
node_id = $i
data_dir = "$DIR/c$i"
grpc_listen = "198.18.0.2$i:7400"
policy = "$DIR/policy.conf"
controllers = $CONTROLLERS
[scheduler]
lease_ttl_ms = $LEASE_TTL_MS
$(tls "controller-$i")
S
    done
    for h in in1 in2; do
        cat >"$DIR/$h.toml" <<S
data_dir = "$DIR/$h"
controllers = $CONTROLLERS
[ingress]
name = "$h"
smtp_listen = ["${IP[$h]}:25"]
http_listen = "${IP[$h]}:8025"
$(tls "ingress-$h")
S
    done
    for h in w1 w2 w3; do
        local ips
        ips=$(printf '"%s", ' ${EXTRA[$h]:-${EXTRA[w1]}})
        cat >"$DIR/$h.toml" <<S
data_dir = "$DIR/$h"
controllers = $CONTROLLERS
[worker]
name = "$h"
source_ips = [${ips%, }]
dns_servers = ["198.18.0.40:53"]
smtp_port = 25
$(tls "worker-$h")
S
    done
    cat >"$DIR/haproxy.cfg" <<H
global
    maxconn 4000
defaults
    mode tcp
    timeout connect 2s
    timeout client 60s
    timeout server 60s
frontend smtp
    bind 198.18.0.2:25
    default_backend ingress
backend ingress
    balance roundrobin
    # A connection refused by a dead ingress goes to the other one.
    retries 3
    option redispatch
    option tcp-check
    tcp-check expect string 220
    server in1 198.18.0.11:25 check inter 500ms fall 2 rise 2
    server in2 198.18.0.12:25 check inter 500ms fall 2 rise 2
H
}

start() {
    local h=$1
    case $h in
    c[1-4]) bg "$h" controller "$SLUICE" controller --settings "$DIR/$h.toml" ;;
    in[12]) bg "$h" ingress "$SLUICE" ingress --settings "$DIR/$h.toml" ;;
    w[123]) bg "$h" worker "$SLUICE" worker --settings "$DIR/$h.toml" ;;
    lb) bg lb haproxy haproxy -db -f "$DIR/haproxy.cfg" ;;
    rx)
        bg rx dnsmasq dnsmasq --no-daemon --conf-file=/dev/null --no-resolv --no-hosts \
            --bind-interfaces --listen-address=198.18.0.40 --port=53 \
            --pid-file="$DIR/dnsmasq.pid" \
            --host-record=mx.rx.test,198.18.0.40 \
            --mx-host=a.test,mx.rx.test,10 --mx-host=b.test,mx.rx.test,10 \
            --mx-host=c.test,mx.rx.test,10
        mkdir -p "$DIR/rx/messages" "$DIR/rx/slow-messages" "$DIR/rx/shared-messages"
        bg rx sink "$SLUICE" sink --listen 198.18.0.40:25 --save-dir "$DIR/rx/messages" \
            --stats "$DIR/rx/stats.json"
        # A receiver of its own for the one queue that both worker hosts send.
        bg rx shared-sink "$SLUICE" sink --listen 198.18.0.40:2527 \
            --save-dir "$DIR/rx/shared-messages" --stats "$DIR/rx/shared-stats.json"
        # A slow receiver (2 s before it answers the final dot), for deliveries in flight.
        bg rx slow-sink "$SLUICE" sink --listen 198.18.0.40:2526 --latency-ms 2000 \
            --save-dir "$DIR/rx/slow-messages" --stats "$DIR/rx/slow-stats.json"
        ;;
    ops | c4 | sw) ;;
    *) echo "no host $h" >&2; return 1 ;;
    esac
}

kill_host() {
    local pids
    pids=$(ip netns pids "$(ns "$1")" 2>/dev/null || true)
    [[ -z $pids ]] || kill -9 $pids 2>/dev/null || true
}

# Waits up to 30 s for TCP ADDR PORT to answer from HOST.
wait_port() {
    local h=$1 addr=$2 port=$3
    for _ in $(seq 300); do
        if on "$h" bash -c "exec 3<>/dev/tcp/$addr/$port" 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    echo "$addr:$port did not answer" >&2
    return 1
}

cli() { on ops "$SLUICE" --tls-dir "$DIR/tls" "$@"; }

up() {
    [[ $(id -u) -eq 0 ]] || { echo "the test bed needs root (network namespaces)" >&2; exit 1; }
    if ip netns list | grep -q "^$P-"; then
        echo "namespaces $P-* exist: run down first" >&2
        exit 1
    fi
    mkdir -p "$DIR/logs"
    DIR=$(cd "$DIR" && pwd)
    trap 'down' ERR
    make_net
    make_certs
    write_files
    start rx
    for h in c1 c2 c3; do start "$h"; done
    for h in c1 c2 c3; do wait_port ops "${IP[$h]}" 7400; done
    cli cluster init -c 198.18.0.21:7400 --member 1=198.18.0.21:7400 \
        --member 2=198.18.0.22:7400 --member 3=198.18.0.23:7400 >/dev/null
    local ready=no
    for _ in $(seq 150); do
        if cli cluster status --ready -c 198.18.0.21:7400 >/dev/null 2>&1; then
            ready=yes
            break
        fi
        sleep 0.2
    done
    [[ $ready == yes ]] || { echo "the controllers formed no cluster" >&2; false; }
    for h in in1 in2 w1 w2 lb; do start "$h"; done
    wait_port ops 198.18.0.2 25
    trap - ERR
    echo "test bed up in $DIR: SMTP at 198.18.0.2:25 (from host ops: $0 exec ops ...)"
}

down() {
    for h in "${HOSTS[@]}" sw; do kill_host "$h"; done
    for h in "${HOSTS[@]}" sw; do ip netns del "$(ns "$h")" 2>/dev/null || true; done
}

cmd=${1:-}
shift || true
case $cmd in
up) up ;;
down) down ;;
kill) kill_host "$1" ;;
start)
    DIR=$(cd "$DIR" && pwd)
    start "$1"
    ;;
link) ip -n "$(ns sw)" link set "$1" "$2" ;;
takeover)
    # As keepalived would: w1 is gone, its source IPs move to w3, whose worker takes them.
    DIR=$(cd "$DIR" && pwd)
    kill_host w1
    for a in ${EXTRA[w1]}; do
        ip -n "$(ns w1)" addr del "$a/15" dev eth0 2>/dev/null || true
        ip -n "$(ns w3)" addr add "$a/15" dev eth0
    done
    start w3
    ;;
exec)
    h=$1
    shift
    # exec: a signal to this script reaches the command itself.
    exec ip netns exec "$(ns "$h")" "$@"
    ;;
*)
    sed -n '2,12p' "$0"
    exit 2
    ;;
esac
