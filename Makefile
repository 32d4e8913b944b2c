# Kite — two commands on a fresh machine:
#   make run    set up and run Kite on embedded defaults (SQLite, no Redis)
#   make test   set up PostgreSQL + Redis and run the whole test suite against them
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test browser-deps faketime-deps prometheus-deps services-start services-stop bench bench-scale clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) manage.py runkite

test: $(STAMP) browser-deps faketime-deps prometheus-deps
	scripts/test.sh

# The browser tests (tests/browser) drive Debian's Chromium: installed like PostgreSQL and Redis
# (scripts/services.sh) when missing; without root and without it, the browser tests fail saying so.
browser-deps:
	@test -x /usr/bin/chromium || [ "$$(id -u)" != 0 ] || { echo "test: installing chromium (Debian package)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# tests/e2e/test_clock.py runs one instance with its clock shifted by Debian's libfaketime (LD_PRELOAD):
# installed the same way.
faketime-deps:
	@test -e /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 || [ "$$(id -u)" != 0 ] || { echo "test: installing faketime (Debian package)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq faketime >/dev/null; }

# tests/test_prometheus.py checks /metrics, deploy/prometheus/alerts.yml and its unit tests with
# promtool, and runs Prometheus against live instances: Debian's prometheus package, installed the same way.
prometheus-deps:
	@test -x /usr/bin/promtool || [ "$$(id -u)" != 0 ] || { echo "test: installing prometheus (Debian package)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

services-start:
	scripts/services.sh start

services-stop:
	scripts/services.sh stop

# make bench BENCH_ARGS='--wait-quiet 1500'   (options: .venv/bin/python bench/ingest.py --help)
bench: $(STAMP)
	$(PY) bench/ingest.py $(BENCH_ARGS)

# Cost as the data grows: 0, 1 M and 10 M stored events (about an hour and 25 GB of disk on a quiet machine).
# make bench-scale BENCH_ARGS='--wait-quiet 1500'   (options: .venv/bin/python bench/scale.py --help)
# wrk (Debian package) is installed when missing, as the browser tests' Chromium is.
bench-scale: $(STAMP)
	@command -v wrk >/dev/null || [ "$$(id -u)" != 0 ] || { echo "bench-scale: installing wrk (Debian package)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
	$(PY) bench/scale.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) var
