#!/usr/bin/env bash
# The README's first command: a one-host cluster (controller, ingress, worker, sink) in the
# foreground. Extra arguments go to `sluice up` (see `sluice up --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup-debian.sh
exec cargo run --quiet -- up "$@"
