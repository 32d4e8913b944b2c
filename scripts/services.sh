#!/usr/bin/env bash
# Start or stop the PostgreSQL 15, Redis and PgBouncer servers that tests and benchmarks use,
# on loopback ports of their own, installing the Debian packages if missing.
#   scripts/services.sh start|stop|status|env
set -euo pipefail

PG_PORT="${KITE_TEST_PG_PORT:-55432}"
REDIS_PORT="${KITE_TEST_REDIS_PORT:-56379}"
# PgBouncer in transaction pooling mode in front of that PostgreSQL (tests/e2e/test_pgbouncer.py).
# The default follows the PostgreSQL port (55432 -> 54432), so runs with ports of their own never
# share it (PG_PORT + 1000 would be the Redis port of a run using 555xx/565xx).
PGBOUNCER_PORT="${KITE_TEST_PGBOUNCER_PORT:-$((PG_PORT - 1000))}"
DIR="${KITE_SERVICES_DIR:-/tmp/kite-services-$PG_PORT}"
PG_BIN=/usr/lib/postgresql/15/bin
as_postgres() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

install_packages() {
  local missing=()
  [ -x "$PG_BIN/postgres" ] || missing+=(postgresql-15)
  command -v redis-server >/dev/null || missing+=(redis-server)
  [ -x /usr/sbin/pgbouncer ] || missing+=(pgbouncer)
  [ ${#missing[@]} -eq 0 ] && return
  echo "services: installing ${missing[*]} (Debian packages)"
  if [ "$(id -u)" != 0 ]; then echo "services: need root to apt-get install ${missing[*]}" >&2; exit 1; fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

start_postgres() {
  mkdir -p "$DIR"
  if [ ! -s "$DIR/pg/PG_VERSION" ]; then
    mkdir -p "$DIR/pg" && chown -R postgres: "$DIR" 2>/dev/null || true
    as_postgres "$PG_BIN/initdb" -D "$DIR/pg" -U postgres --auth=trust -E UTF8 >/dev/null
    cat >> "$DIR/pg/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$DIR'
max_connections = 300
shared_buffers = 256MB
fsync = on
synchronous_commit = on
log_min_messages = warning
CONF
  fi
  if ! as_postgres "$PG_BIN/pg_ctl" -D "$DIR/pg" status >/dev/null 2>&1; then
    # KITE_PG_OPTIONS: extra server options, e.g. "-c track_commit_timestamp=on" (bench/federation.py)
    # The ports lie in Linux's ephemeral range: a client socket of some other program can hold
    # one for a while (TIME_WAIT). Try again rather than fail the run.
    for attempt in 1 2 3 4 5 6; do
      as_postgres "$PG_BIN/pg_ctl" -D "$DIR/pg" -l "$DIR/pg.log" -w -t 60 ${KITE_PG_OPTIONS:+-o "$KITE_PG_OPTIONS"} start >/dev/null && break
      [ "$attempt" = 6 ] && { echo "services: PostgreSQL did not start on $PG_PORT; see $DIR/pg.log" >&2; exit 1; }
      echo "services: PostgreSQL did not start on $PG_PORT (attempt $attempt); retrying in 10 s" >&2
      sleep 10
    done
  fi
  echo "services: PostgreSQL on 127.0.0.1:$PG_PORT"
}

start_redis() {
  if ! redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; then
    for attempt in 1 2 3 4 5 6; do
      redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
        --daemonize yes --pidfile "$DIR/redis.pid" --logfile "$DIR/redis.log" --dir "$DIR"
      for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
      redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break
      [ "$attempt" = 6 ] && { echo "services: Redis did not start on $REDIS_PORT; see $DIR/redis.log" >&2; exit 1; }
      echo "services: Redis did not start on $REDIS_PORT (attempt $attempt); retrying in 10 s" >&2
      sleep 10
    done
  fi
  echo "services: Redis on 127.0.0.1:$REDIS_PORT"
}

start_pgbouncer() {
  # Every database name goes to the test PostgreSQL (e2e tests create databases of their own);
  # trust on loopback, as the test PostgreSQL. PgBouncer refuses to run as root: it runs as postgres.
  cat > "$DIR/pgbouncer.ini" <<CONF
[databases]
* = host=127.0.0.1 port=$PG_PORT

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGBOUNCER_PORT
unix_socket_dir =
auth_type = trust
auth_file = $DIR/pgbouncer-users.txt
pool_mode = transaction
max_client_conn = 1000
; fewer server sessions than one busy Kite instance holds connections: tests see real multiplexing
default_pool_size = 10
pidfile = $DIR/pgbouncer.pid
logfile = $DIR/pgbouncer.log
log_connections = 0
log_disconnections = 0
admin_users = postgres
CONF
  echo '"postgres" ""' > "$DIR/pgbouncer-users.txt"
  if ! pgbouncer_running; then
    for attempt in 1 2 3 4 5 6; do
      as_postgres /usr/sbin/pgbouncer -q -d "$DIR/pgbouncer.ini" || true
      for _ in $(seq 50); do "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PGBOUNCER_PORT" && break; sleep 0.1; done
      "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PGBOUNCER_PORT" && break
      [ "$attempt" = 6 ] && { echo "services: PgBouncer did not start on $PGBOUNCER_PORT; see $DIR/pgbouncer.log" >&2; exit 1; }
      echo "services: PgBouncer did not start on $PGBOUNCER_PORT (attempt $attempt); retrying in 10 s" >&2
      sleep 10
    done
  fi
  echo "services: PgBouncer (transaction pooling) on 127.0.0.1:$PGBOUNCER_PORT"
}

pgbouncer_running() { [ -f "$DIR/pgbouncer.pid" ] && kill -0 "$(cat "$DIR/pgbouncer.pid")" 2>/dev/null; }

stop_pgbouncer() {
  pgbouncer_running || return 0
  local pid; pid="$(cat "$DIR/pgbouncer.pid")"
  kill -INT "$pid" 2>/dev/null || true  # safe shutdown: running transactions finish, clients are not waited for
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
}

stop_all() {
  stop_pgbouncer
  [ -f "$DIR/pg/postmaster.pid" ] && as_postgres "$PG_BIN/pg_ctl" -D "$DIR/pg" -m fast -w stop >/dev/null || true
  redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
  echo "services: stopped"
}

case "${1:-}" in
  start) install_packages; start_postgres; start_redis; start_pgbouncer ;;
  stop) stop_all ;;
  status)
    as_postgres "$PG_BIN/pg_ctl" -D "$DIR/pg" status; redis-cli -p "$REDIS_PORT" ping
    "$PG_BIN/pg_isready" -h 127.0.0.1 -p "$PGBOUNCER_PORT" ;;
  env)
    echo "export DATABASE_URL=postgres://postgres@127.0.0.1:$PG_PORT/kite"
    echo "export REDIS_URL=redis://127.0.0.1:$REDIS_PORT/0"
    echo "export KITE_TEST_PGBOUNCER_URL=postgres://postgres@127.0.0.1:$PGBOUNCER_PORT/kite" ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
