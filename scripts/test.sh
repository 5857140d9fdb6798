#!/usr/bin/env bash
# Install everything the test suite needs into .venv, then run the whole suite.
# Non-Python needs, from Debian's packages (installed when missing, as root): wrk (the
# benchmark's load generator, smoke-tested by the suite) and pg_auto_failover for PostgreSQL 15
# (tests/test_failover.py builds a monitor + primary + synchronous standby from it).
# PostgreSQL for the other tests comes from the pip package pgserver unless COUPON_TEST_DSN
# names a server.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v pg_autoctl >/dev/null 2>&1 || missing+=(pg-auto-failover-cli)
[ -e /usr/lib/postgresql/15/lib/pgautofailover.so ] || missing+=(postgresql-15-auto-failover)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt_lock=(-o DPkg::Lock::Timeout=600)
    apt-get "${apt_lock[@]}" update -qq
    DEBIAN_FRONTEND=noninteractive apt-get "${apt_lock[@]}" install -y -qq "${missing[@]}" >/dev/null
  else
    echo "scripts/test.sh: missing ${missing[*]}; install them first (Debian/Ubuntu: sudo apt-get install ${missing[*]})" >&2
    exit 1
  fi
fi
python3 -m venv .venv
.venv/bin/pip install -q -e '.[test]'
exec .venv/bin/python -m pytest "$@"
