#!/usr/bin/env bash
# The README's test command: installs what the tests need, then runs the whole suite
# (pytest, including ruff and mypy as tests). Works on a fresh Debian 12 machine with Python >= 3.11.
#   scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${GOCHAT_VENV:-.venv}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# A C compiler, Python headers and venv are needed to build the Cython extensions.
need_apt=()
command -v cc >/dev/null 2>&1 || need_apt+=(build-essential)
"$PYTHON" -c 'import sysconfig, os, sys; sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")) else 1)' \
  || need_apt+=(python3-dev)
"$PYTHON" -c 'import ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
# promtool and amtool check and unit-test the monitoring in deploy/ (tests/test_deploy_monitoring.py).
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
command -v amtool >/dev/null 2>&1 || need_apt+=(prometheus-alertmanager)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "test.sh: installing ${need_apt[*]} with apt-get" >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
# Editable install: builds gochat._native.* in place (the tests import the source tree).
"$VENV/bin/python" -m pip install -q -e '.[test]'
"$VENV/bin/python" -c 'import gochat._native.codec, gochat._native.connection, gochat._native.routing, gochat._native.session' \
  || { echo "test.sh: the native modules did not build" >&2; exit 1; }

# PostgreSQL and Redis for the store, cluster and end-to-end tests: started (or installed and
# started) when they are not already answering on 127.0.0.1:5432 / :6379.
scripts/services.sh

exec "$VENV/bin/python" -m pytest "$@"
