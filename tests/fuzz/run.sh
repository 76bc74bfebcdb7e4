#!/usr/bin/env bash
# Runs every fuzz target for SECONDS (default 30) each, starting from the checked-in seeds.
# New inputs go to a scratch corpus, never into the seeds. A crash stops the run and leaves
# its input under tests/fuzz/artifacts/TARGET/; make it a regression test.
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-30}"
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked --version 0.13.2
fi
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
# -s none: Rust is memory-safe; what is looked for is panics, overflow (debug assertions are
# on) and runaway allocation. It also builds on the stable toolchain.
# Its own target folder: the instrumented build must not mix with the main one.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}/fuzz"
cargo fuzz build --fuzz-dir . -s none
for target in smtp_command smtp_reply dot_stuffing policy_parse header_scan smtp_session; do
    mkdir -p "$scratch/$target"
    echo "fuzz: $target for ${seconds}s"
    log="$scratch/$target.log"
    if ! cargo fuzz run --fuzz-dir . -s none "$target" "$scratch/$target" "seeds/$target" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 \
        >"$log" 2>&1; then
        tail -n 60 "$log"
        echo "fuzz: $target failed; the input is under tests/fuzz/artifacts/$target/" >&2
        exit 1
    fi
    grep -E "^(Done|stat::number_of_executed_units|stat::peak_rss_mb)" "$log" | tr '\n' ' '
    echo
done
