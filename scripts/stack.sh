#!/usr/bin/env bash
# The embedded stack (no Docker): an SQS emulator on :4566 and PostgreSQL on :5432.
#
#   scripts/stack.sh start    start what does not already answer; idempotent
#   scripts/stack.sh start --sqs moto    the same, with moto's server as the SQS emulator
#   scripts/stack.sh stop     stop only what this script started
#   scripts/stack.sh status
#
# SQS: LocalStack 4.11.1 run on the host from PyPI, in its own virtual environment (cached in
# $LOGIN_ETL_CACHE, default ~/.cache/login-etl); or, with `--sqs moto` (or STACK_SQS=moto), moto's
# server from the project venv (docs/operations.md, "The second SQS emulator"). PostgreSQL: the server already on :5432 if one
# answers; otherwise a private cluster in .stack/pgdata from the machine's binaries (installed with
# apt if absent). Logs and pid files live in .stack/ (git-ignored).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${LOGIN_ETL_STATE:-$ROOT/.stack}
CACHE=${LOGIN_ETL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/login-etl}
SQS_PORT=${STACK_SQS_PORT:-4566}
KMS_PORT=${STACK_KMS_PORT:-4599}
PG_PORT=${STACK_PG_PORT:-5432}
LOCALSTACK_VERSION=4.11.1
# LocalStack 4.11.1 on Python 3.11 needs these pins (newer pyOpenSSL/psutil removed APIs it uses).
LOCALSTACK_PACKAGES=("localstack-core[runtime]==$LOCALSTACK_VERSION" "cbor2<6" "service_identity<26"
  "pyOpenSSL==25.3.0" "psutil<7")
LS_VENV=$CACHE/localstack-$LOCALSTACK_VERSION
SQS_EMULATOR=${STACK_SQS:-localstack}
mkdir -p "$STATE/logs"

log() { echo "stack: $*" >&2; }

sqs_up() { curl -fsS -m 2 "http://127.0.0.1:$SQS_PORT/_localstack/health" >/dev/null 2>&1 \
  || curl -sS -m 2 -o /dev/null "http://127.0.0.1:$SQS_PORT/" 2>/dev/null; }
pg_up() { pg_isready -q -h 127.0.0.1 -p "$PG_PORT" 2>/dev/null; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

pg_bindir() {
  local dir
  for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    [ -x "$dir/initdb" ] && { echo "$dir"; return 0; }
  done
  return 1
}

start_sqs() {
  if sqs_up; then log "SQS: something already answers on :$SQS_PORT, using it"; return; fi
  if [ "$SQS_EMULATOR" = moto ]; then start_moto_sqs; return; fi
  if [ ! -x "$LS_VENV/bin/python" ] || ! "$LS_VENV/bin/python" -c "import localstack" 2>/dev/null; then
    log "SQS: installing LocalStack $LOCALSTACK_VERSION into $LS_VENV (once, ~1 min)"
    rm -rf "$LS_VENV"
    python3 -m venv "$LS_VENV"
    "$LS_VENV/bin/pip" install -q --disable-pip-version-check "${LOCALSTACK_PACKAGES[@]}" \
      >>"$STATE/logs/localstack-install.log" 2>&1
  fi
  log "SQS: starting LocalStack on 127.0.0.1:$SQS_PORT (log: $STATE/logs/localstack.log)"
  mkdir -p "$STATE/localstack"
  (
    cd "$STATE/localstack"
    GATEWAY_LISTEN=127.0.0.1:$SQS_PORT LOCALSTACK_HOST=localhost:$SQS_PORT SERVICES=sqs \
      SQS_ENDPOINT_STRATEGY=off EAGER_SERVICE_LOADING=1 DNS_ADDRESS=0 DISABLE_EVENTS=1 \
      SKIP_SSL_CERT_DOWNLOAD=1 OVERRIDE_IN_DOCKER=0 FILESYSTEM_ROOT="$STATE/localstack" \
      nohup setsid "$LS_VENV/bin/python" -m localstack.runtime.main \
      >>"$STATE/logs/localstack.log" 2>&1 &
    echo $! >"$STATE/localstack.pid"
  )
  for _ in $(seq 120); do
    sqs_up && { log "SQS: ready"; return; }
    alive "$STATE/localstack.pid" || break
    sleep 0.5
  done
  log "SQS: LocalStack did not start; last lines of its log:"; tail -20 "$STATE/logs/localstack.log" >&2
  exit 1
}

start_pg() {
  if pg_up; then log "PostgreSQL: already answers on :$PG_PORT, using it"; return; fi
  local bindir
  if ! bindir=$(pg_bindir); then
    log "PostgreSQL: binaries absent, installing with apt"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >>"$STATE/logs/apt.log" 2>&1 \
      || { apt-get update -q >>"$STATE/logs/apt.log" 2>&1 \
           && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >>"$STATE/logs/apt.log" 2>&1; }
    bindir=$(pg_bindir)
    if pg_up; then log "PostgreSQL: the package started a server on :$PG_PORT, using it"; return; fi
  fi
  local data=$STATE/pgdata owner=postgres
  id -u "$owner" >/dev/null 2>&1 || owner=$(id -un)
  as_owner() { if [ "$(id -un)" = "$owner" ]; then "$@"; else runuser -u "$owner" -- "$@"; fi; }
  if [ ! -f "$data/PG_VERSION" ]; then
    log "PostgreSQL: creating a private cluster in $data"
    mkdir -p "$data" && chown "$owner" "$data" "$STATE/logs"
    as_owner "$bindir/initdb" -D "$data" -U postgres --auth=trust -E UTF8 >>"$STATE/logs/initdb.log" 2>&1
  fi
  chown "$owner" "$STATE/logs"
  log "PostgreSQL: starting the private cluster on 127.0.0.1:$PG_PORT (log: $STATE/logs/postgres.log)"
  as_owner "$bindir/pg_ctl" -D "$data" -l "$STATE/logs/postgres.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $data" start >/dev/null
  echo "$bindir" >"$STATE/pg.started"
  psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname='test'" \
    | grep -q 1 || psql -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -c "CREATE DATABASE test"
}

# SQS on moto's server (--sqs moto): written independently of LocalStack, already in requirements-dev.
start_moto_sqs() {
  if [ ! -x "$ROOT/.venv/bin/moto_server" ]; then
    log "SQS: moto_server not in .venv (make venv installs requirements-dev.txt)"; exit 1
  fi
  log "SQS: starting moto on 127.0.0.1:$SQS_PORT (log: $STATE/logs/moto-sqs.log)"
  MOTO_ACCOUNT_ID=000000000000 nohup setsid "$ROOT/.venv/bin/moto_server" -H 127.0.0.1 -p "$SQS_PORT" \
    >>"$STATE/logs/moto-sqs.log" 2>&1 &
  echo $! >"$STATE/moto-sqs.pid"
  for _ in $(seq 60); do sqs_up && { log "SQS: ready (moto)"; return; }; sleep 0.25; done
  log "SQS: moto did not start; see $STATE/logs/moto-sqs.log"; exit 1
}

# KMS for the key tests (LocalStack 4.11.1's KMS fails on Python 3.11): moto's server from the
# project venv, when requirements-dev.txt installed it. Account 000000000000, as LocalStack's.
kms_up() { curl -sS -m 2 -o /dev/null "http://127.0.0.1:$KMS_PORT/" 2>/dev/null; }
start_kms() {
  if kms_up; then log "KMS: something already answers on :$KMS_PORT, using it"; return; fi
  if [ ! -x "$ROOT/.venv/bin/moto_server" ]; then
    log "KMS: skipped (moto_server not in .venv: pip install -r requirements-dev.txt)"; return
  fi
  log "KMS: starting moto on 127.0.0.1:$KMS_PORT (log: $STATE/logs/moto-kms.log)"
  MOTO_ACCOUNT_ID=000000000000 nohup setsid "$ROOT/.venv/bin/moto_server" -H 127.0.0.1 -p "$KMS_PORT" \
    >>"$STATE/logs/moto-kms.log" 2>&1 &
  echo $! >"$STATE/moto-kms.pid"
  for _ in $(seq 60); do kms_up && { log "KMS: ready"; return; }; sleep 0.25; done
  log "KMS: moto did not start; see $STATE/logs/moto-kms.log"; exit 1
}
stop_kms() {
  if alive "$STATE/moto-kms.pid"; then
    log "KMS: stopping moto (pid $(cat "$STATE/moto-kms.pid"))"
    kill -TERM "$(cat "$STATE/moto-kms.pid")" 2>/dev/null || true
  fi
  rm -f "$STATE/moto-kms.pid"
}

stop_all() {
  if alive "$STATE/localstack.pid"; then
    local pid; pid=$(cat "$STATE/localstack.pid")
    log "SQS: stopping LocalStack (pid $pid)"
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$STATE/localstack.pid"
  if alive "$STATE/moto-sqs.pid"; then
    log "SQS: stopping moto (pid $(cat "$STATE/moto-sqs.pid"))"
    kill -TERM "$(cat "$STATE/moto-sqs.pid")" 2>/dev/null || true
  fi
  rm -f "$STATE/moto-sqs.pid"
  if [ -f "$STATE/pg.started" ]; then
    local bindir owner=postgres; bindir=$(cat "$STATE/pg.started")
    id -u "$owner" >/dev/null 2>&1 || owner=$(id -un)
    log "PostgreSQL: stopping the private cluster"
    if [ "$(id -un)" = "$owner" ]; then "$bindir/pg_ctl" -D "$STATE/pgdata" -m fast -w stop >/dev/null || true
    else runuser -u "$owner" -- "$bindir/pg_ctl" -D "$STATE/pgdata" -m fast -w stop >/dev/null || true; fi
    rm -f "$STATE/pg.started"
  fi
}

command=${1:-}
shift || true
while [ $# -gt 0 ]; do
  case $1 in
    --sqs) SQS_EMULATOR=${2:-}; shift 2 || { echo "usage: $0 start --sqs localstack|moto" >&2; exit 2; } ;;
    --sqs=*) SQS_EMULATOR=${1#--sqs=}; shift ;;
    *) echo "usage: $0 start [--sqs localstack|moto] | stop | status" >&2; exit 2 ;;
  esac
done
case $SQS_EMULATOR in localstack|moto) ;; *) echo "stack: --sqs must be localstack or moto" >&2; exit 2 ;; esac

case "$command" in
  start) start_sqs; start_pg; start_kms ;;
  stop) stop_all; stop_kms ;;
  status)
    sqs_up && echo "SQS :$SQS_PORT up$( (alive "$STATE/localstack.pid" || alive "$STATE/moto-sqs.pid") \
      && echo ' (started by stack.sh)')" \
      || echo "SQS :$SQS_PORT down"
    pg_up && echo "PostgreSQL :$PG_PORT up$([ -f "$STATE/pg.started" ] && echo ' (started by stack.sh)')" \
      || echo "PostgreSQL :$PG_PORT down"
    kms_up && echo "KMS :$KMS_PORT up$(alive "$STATE/moto-kms.pid" && echo ' (started by stack.sh)')" \
      || echo "KMS :$KMS_PORT down" ;;
  *) echo "usage: $0 start [--sqs localstack|moto] | stop | status" >&2; exit 2 ;;
esac
