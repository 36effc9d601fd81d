#!/usr/bin/env bash
# Make sure PostgreSQL and Redis answer on 127.0.0.1 for the test suite.
#
#   scripts/services.sh
#
# If both already answer (127.0.0.1:5432 and 127.0.0.1:6379), it only checks that the database
# `test` exists and prints nothing. Otherwise, on Debian/Ubuntu, it installs what is missing
# (apt-get install postgresql redis-server, as root or through sudo), creates and starts the
# PostgreSQL cluster without systemd (pg_ctlcluster --skip-systemctl-redirect), allows trust
# authentication for 127.0.0.1 (a throwaway test server: never run this on a production host),
# starts Redis in the background without persistence, creates the database `test`, and waits
# (bounded) until both answer. Exits non-zero with a clear message when it cannot.
# Idempotent: run it as often as you like.
#
# The tests then use GOCHAT_TEST_POSTGRES_DSN (default postgresql://postgres@127.0.0.1:5432/test)
# and GOCHAT_TEST_REDIS_URL (default redis://127.0.0.1:6379/0).
#
# Knobs (environment): GOCHAT_PG_PORT (5432), GOCHAT_PG_CLUSTER (main), GOCHAT_REDIS_PORT (6379),
# GOCHAT_SERVICES_WAIT_S (60).
set -euo pipefail

PG_PORT=${GOCHAT_PG_PORT:-5432}
PG_CLUSTER=${GOCHAT_PG_CLUSTER:-main}
REDIS_PORT=${GOCHAT_REDIS_PORT:-6379}
WAIT_S=${GOCHAT_SERVICES_WAIT_S:-60}
HOST=127.0.0.1

say() { echo "services.sh: $*" >&2; }
die() { say "ERROR: $*"; exit 1; }

as_root() {
  if [ "$(id -u)" = 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo -n "$@" || die "'$*' needs root: run as root or configure passwordless sudo"
  else
    die "'$*' needs root and sudo is not installed"
  fi
}

# Does something accept TCP connections on HOST:$1? (bash's /dev/tcp, 2 s bound)
port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/$HOST/$1" >/dev/null 2>&1; }

pg_answers() {
  if command -v pg_isready >/dev/null 2>&1; then
    pg_isready -q -h "$HOST" -p "$PG_PORT" -t 2 >/dev/null 2>&1
  else
    port_open "$PG_PORT"
  fi
}

redis_answers() {
  if command -v redis-cli >/dev/null 2>&1; then
    [ "$(timeout 3 redis-cli -h "$HOST" -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]
  else
    port_open "$REDIS_PORT"
  fi
}

psql_postgres() { psql -X -q -v ON_ERROR_STOP=1 -h "$HOST" -p "$PG_PORT" -U postgres -d postgres "$@"; }

ensure_test_db() {
  # Only possible when psql is here and we may log in as postgres (trust, or a PGPASSWORD).
  command -v psql >/dev/null 2>&1 || return 0
  local exists
  if ! exists=$(psql_postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'test'" 2>/dev/null); then
    say "cannot log in to PostgreSQL on $HOST:$PG_PORT as postgres to check database 'test';" \
      "set GOCHAT_TEST_POSTGRES_DSN to a DSN that works"
    return 0
  fi
  if [ "$exists" != 1 ]; then
    psql_postgres -c "CREATE DATABASE test" >/dev/null 2>&1 \
      || psql_postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'test'" | grep -q 1 \
      || die "could not create database 'test'"
    say "created database 'test'"
  fi
}

need_pg=0
need_redis=0
pg_answers || need_pg=1
redis_answers || need_redis=1
if [ $need_pg = 0 ] && [ $need_redis = 0 ]; then
  ensure_test_db
  exit 0
fi

# ---- install what is missing ------------------------------------------------------------------
packages=()
if [ $need_pg = 1 ] && ! command -v pg_ctlcluster >/dev/null 2>&1; then packages+=(postgresql); fi
if [ $need_redis = 1 ] && ! command -v redis-server >/dev/null 2>&1; then packages+=(redis-server); fi
if [ ${#packages[@]} -gt 0 ]; then
  command -v apt-get >/dev/null 2>&1 \
    || die "${packages[*]} not installed and this is not a Debian-like system: install and start them yourself"
  say "installing ${packages[*]} with apt-get"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  # policy-rc.d-style containers may refuse to start services at install: we start them below.
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null
fi

# ---- PostgreSQL -------------------------------------------------------------------------------
if [ $need_pg = 1 ]; then
  version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -z "$version" ] || [ ! -d "/etc/postgresql/$version/$PG_CLUSTER" ]; then
    [ -n "$version" ] || version=$(ls /usr/lib/postgresql 2>/dev/null | sort -V | tail -n 1 || true)
    [ -n "$version" ] || die "no PostgreSQL server binaries found under /usr/lib/postgresql"
    say "creating PostgreSQL $version cluster '$PG_CLUSTER' on port $PG_PORT"
    as_root pg_createcluster --port "$PG_PORT" "$version" "$PG_CLUSTER" >/dev/null
  fi
  conf_dir=/etc/postgresql/$version/$PG_CLUSTER
  hba=$conf_dir/pg_hba.conf
  port=$(as_root sed -n 's/^[[:space:]]*port[[:space:]]*=[[:space:]]*\([0-9]*\).*/\1/p' "$conf_dir/postgresql.conf" | tail -n 1)
  [ -z "$port" ] || [ "$port" = "$PG_PORT" ] \
    || die "cluster $version/$PG_CLUSTER listens on port $port, not $PG_PORT (set GOCHAT_PG_PORT=$port)"
  # Trust for 127.0.0.1: the first matching pg_hba line wins, so ours goes first.
  if ! as_root grep -Eq '^host[[:space:]]+all[[:space:]]+all[[:space:]]+127\.0\.0\.1/32[[:space:]]+trust' "$hba"; then
    say "allowing trust authentication from 127.0.0.1 in $hba (test server only)"
    as_root sed -i '1i host all all 127.0.0.1/32 trust' "$hba"
  fi
  status=0
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" "$PG_CLUSTER" status >/dev/null 2>&1 || status=$?
  if [ $status = 0 ]; then
    # running but not answering yet (starting up), or just re-configured: reload pg_hba
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" "$PG_CLUSTER" reload >/dev/null 2>&1 || true
  else
    say "starting PostgreSQL $version/$PG_CLUSTER"
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" "$PG_CLUSTER" start \
      || die "pg_ctlcluster could not start PostgreSQL $version/$PG_CLUSTER (see /var/log/postgresql/)"
  fi
fi

# ---- Redis --------------------------------------------------------------------------------------
if [ $need_redis = 1 ]; then
  if port_open "$REDIS_PORT"; then
    die "something listens on $HOST:$REDIS_PORT but does not answer PING like Redis"
  fi
  say "starting redis-server on $HOST:$REDIS_PORT (no persistence)"
  redis-server --daemonize yes --bind "$HOST" --port "$REDIS_PORT" --save "" --appendonly no \
    --logfile "${TMPDIR:-/tmp}/gochat-redis-$REDIS_PORT.log" >/dev/null \
    || die "redis-server did not start (see ${TMPDIR:-/tmp}/gochat-redis-$REDIS_PORT.log)"
fi

# ---- wait until both answer ------------------------------------------------------------------
deadline=$((SECONDS + WAIT_S))
until pg_answers && redis_answers; do
  if [ $SECONDS -ge $deadline ]; then
    pg_answers || say "PostgreSQL does not answer on $HOST:$PG_PORT"
    redis_answers || say "Redis does not answer on $HOST:$REDIS_PORT"
    die "services not ready after ${WAIT_S}s"
  fi
  sleep 0.5
done
ensure_test_db
say "PostgreSQL on $HOST:$PG_PORT and Redis on $HOST:$REDIS_PORT are ready"
