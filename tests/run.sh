#!/usr/bin/env bash
# The README's test command: installs what the tests talk to, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup-debian.sh --tests
exec cargo test --workspace "$@"
