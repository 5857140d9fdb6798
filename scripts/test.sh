#!/usr/bin/env bash
# Install everything the test suite needs into .venv, then run the whole suite.
# The only non-Python need is wrk (the benchmark's load generator, smoke-tested by the suite);
# PostgreSQL comes from the pip package pgserver unless COUPON_TEST_DSN names a server.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v wrk >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
  else
    echo "scripts/test.sh: wrk is missing; install it first (Debian/Ubuntu: sudo apt-get install wrk)" >&2
    exit 1
  fi
fi
python3 -m venv .venv
.venv/bin/pip install -q -e '.[test]'
exec .venv/bin/python -m pytest "$@"
