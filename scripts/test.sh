#!/usr/bin/env bash
# Install everything the test suite needs into .venv, then run the whole suite.
# Non-Python needs, from Debian's packages: wrk and h2load (the benchmark's load generators for
# HTTP/1.1 and for HTTP/2 and gRPC, smoke-tested by the suite), pgbouncer (the
# transaction-pooling test) and, for the container test (scripts/container_test.sh, run as
# root), podman with runc, mmdebstrap, podman-compose and curl. PostgreSQL comes from the pip
# package pgserver unless COUPON_TEST_DSN names a server.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
for tool in wrk podman runc mmdebstrap podman-compose curl; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")  # each tool is its package's name
done
command -v h2load >/dev/null 2>&1 || missing+=(nghttp2-client)  # h2load's package
# pgbouncer installs into /usr/sbin, which is not on every user's PATH.
[ -x /usr/sbin/pgbouncer ] || command -v pgbouncer >/dev/null 2>&1 || missing+=(pgbouncer)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
      "${missing[@]}" >/dev/null
  elif ! command -v wrk >/dev/null 2>&1 || ! command -v h2load >/dev/null 2>&1 \
    || ! { [ -x /usr/sbin/pgbouncer ] || command -v pgbouncer >/dev/null 2>&1; }; then
    echo "scripts/test.sh: wrk, h2load and pgbouncer are needed; install them first" \
      "(Debian/Ubuntu: sudo apt-get install wrk nghttp2-client pgbouncer)" >&2
    exit 1
  fi
  # Not root: the container test skips itself (it needs root), so only wrk, h2load and
  # pgbouncer are required.
fi
python3 -m venv .venv
.venv/bin/pip install -q -e '.[test]'
exec .venv/bin/python -m pytest "$@"
