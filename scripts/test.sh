#!/usr/bin/env bash
# make test: start PostgreSQL + Redis on loopback, run pytest against them, stop them.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh start
trap 'scripts/services.sh stop' EXIT
eval "$(scripts/services.sh env)"
export KITE_DATA_DIR="${KITE_DATA_DIR:-$(mktemp -d /tmp/kite-test-data.XXXXXX)}"
.venv/bin/python -m pytest "$@"
