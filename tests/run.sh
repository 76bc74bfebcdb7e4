#!/usr/bin/env bash
# The README's test command: installs what the tests talk to, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup-debian.sh --tests
# --tests: unit and integration tests. Examples are benchmarks (clippy --all-targets checks
# them) and there are no doctests, so neither is built here: CI's time on 2 cores is tight.
cargo test --workspace --tests "$@"
# Every parser that reads what strangers send, fuzzed for a bounded time (FUZZ_SECONDS each;
# 30 s keeps a clean-clone CI run on 2 cores under 45 minutes).
tests/fuzz/run.sh "${FUZZ_SECONDS:-30}"
