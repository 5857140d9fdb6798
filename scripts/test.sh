#!/usr/bin/env bash
# Install everything the test suite needs into .venv, then run the whole suite.
# The only non-Python needs are the benchmark's load generators, smoke-tested by the suite:
# wrk (HTTP/1.1) and h2load (HTTP/2 and gRPC, Debian's nghttp2-client). PostgreSQL comes from
# the pip package pgserver unless COUPON_TEST_DSN names a server.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v wrk >/dev/null 2>&1 || ! command -v h2load >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 \
      wrk nghttp2-client >/dev/null
  else
    echo "scripts/test.sh: wrk or h2load is missing; install them first" \
      "(Debian/Ubuntu: sudo apt-get install wrk nghttp2-client)" >&2
    exit 1
  fi
fi
python3 -m venv .venv
.venv/bin/pip install -q -e '.[test]'
exec .venv/bin/python -m pytest "$@"
