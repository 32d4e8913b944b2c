#!/usr/bin/env bash
# make test: start PostgreSQL + Redis on loopback, run pytest against them, stop them.
#   scripts/test.sh               the whole suite, in two parts (below)
#   scripts/test.sh ARGS…         pytest ARGS… (one file, one test, -n 2 …)
set -euo pipefail
cd "$(dirname "$0")/.."
PG_PORT="${KITE_TEST_PG_PORT:-55432}"
REDIS_PORT="${KITE_TEST_REDIS_PORT:-56379}"
# A second PostgreSQL and Redis for the second xdist worker (tests/workers.py), on the next ports.
second() { KITE_TEST_PG_PORT=$((PG_PORT + 1)) KITE_TEST_REDIS_PORT=$((REDIS_PORT + 1)) scripts/services.sh "$@"; }
trap 'scripts/services.sh stop; second stop' EXIT
scripts/services.sh start
second start
eval "$(second env | grep -E 'DATABASE_URL|REDIS_URL' | sed 's/^export /export KITE_TEST_GW1_/')"
eval "$(scripts/services.sh env)"
export KITE_DATA_DIR="${KITE_DATA_DIR:-$(mktemp -d /tmp/kite-test-data.XXXXXX)}"
if [ $# -gt 0 ]; then
  .venv/bin/python -m pytest "$@"
  exit
fi
# The tests that start Kite processes, Chromium or Prometheus, several of them timing what those do,
# run one at a time; the rest, in this process, on two workers.
SERIAL=(tests/browser tests/chaos tests/e2e tests/test_prometheus.py)
status=0
.venv/bin/python -m pytest -n 2 "${SERIAL[@]/#/--ignore=}" || status=$?
.venv/bin/python -m pytest "${SERIAL[@]}" || status=$?
exit $status
