#!/usr/bin/env bash
# The README's test command: installs what the tests talk to, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup-debian.sh --tests
cargo test --workspace "$@"
# Every parser that reads what strangers send, fuzzed for a bounded time (FUZZ_SECONDS each;
# 30 s keeps a clean-clone CI run on 2 cores under 45 minutes).
tests/fuzz/run.sh "${FUZZ_SECONDS:-30}"
