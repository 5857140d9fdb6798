#!/usr/bin/env bash
# Install everything the test suite needs into .venv, then run the whole suite.
# Non-Python needs, from Debian's packages: wrk and h2load (nghttp2-client; the benchmark's
# load generators for HTTP/1.1 and for HTTP/2 and gRPC, smoke-tested by the suite), pgbouncer
# (the transaction-pooling test), pg_auto_failover for PostgreSQL 15 (tests/test_failover.py
# builds a monitor + primary + synchronous standby from it) and, for the container test
# (scripts/container_test.sh, run as root), podman with runc, mmdebstrap, podman-compose and
# curl. PostgreSQL for the other tests comes from the pip package pgserver unless
# COUPON_TEST_DSN names a server.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
for tool in wrk podman runc mmdebstrap podman-compose curl; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")  # each tool is its package's name
done
command -v h2load >/dev/null 2>&1 || missing+=(nghttp2-client)  # h2load's package
# pgbouncer installs into /usr/sbin, which is not on every user's PATH.
[ -x /usr/sbin/pgbouncer ] || command -v pgbouncer >/dev/null 2>&1 || missing+=(pgbouncer)
command -v pg_autoctl >/dev/null 2>&1 || missing+=(pg-auto-failover-cli)
[ -e /usr/lib/postgresql/15/lib/pgautofailover.so ] || missing+=(postgresql-15-auto-failover)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
      "${missing[@]}" >/dev/null
  else
    # Not root: the container test skips itself (it needs root); the others need theirs.
    required=()
    for package in "${missing[@]}"; do
      case "$package" in
        wrk | nghttp2-client | pgbouncer | pg-auto-failover-cli | postgresql-15-auto-failover) required+=("$package") ;;
      esac
    done
    if [ ${#required[@]} -gt 0 ]; then
      echo "scripts/test.sh: ${required[*]} missing; install first (Debian/Ubuntu: sudo apt-get install ${required[*]})" >&2
      exit 1
    fi
  fi
fi
python3 -m venv .venv
.venv/bin/pip install -q -e '.[test]'
exec .venv/bin/python -m pytest "$@"
