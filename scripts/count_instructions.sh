#!/usr/bin/env bash
# Instructions the server process executes per IssueCoupon call, counted by valgrind: unlike
# throughput or CPU time, the count barely moves with the machine's load, so two commits (or
# two trees) compare exactly even on a busy machine.
#
#   scripts/count_instructions.sh memory            # this checkout, memory store, 2000 calls
#   scripts/count_instructions.sh soldout 1000      # answers on a sold-out campaign
#   scripts/count_instructions.sh echo              # scripts/echo_server.py, the baseline
#   TREE=../wt-v1 scripts/count_instructions.sh memory   # another checkout (same venv)
#
# The server (1 worker, memory store, default config: no keys, so open on loopback) runs under
# `valgrind --tool=callgrind` twice, answering N and then 3N calls (h2load over HTTP/1.1, 16
# connections, after 200 unmeasured calls); the difference of the two totals divided by 2N is
# the cost of a call, start-up and shutdown cancelled out. Kernel time (socket system calls)
# is not counted. Needs valgrind, h2load (nghttp2-client) and curl; takes about a minute.
set -euo pipefail

path=${1:?usage: count_instructions.sh memory|soldout|echo [calls]}
calls=${2:-2000}
tree=$(cd "${TREE:-$(dirname "$0")/..}" && pwd)
python=${PYTHON:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

free_port() {
  "$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Total instructions of one server run that answers $1 measured calls.
run_once() {
  local n=$1 port pid campaign total
  port=$(free_port)
  if [ "$path" = echo ]; then
    set -- "$python" "$tree/scripts/echo_server.py" --port "$port"
  else
    printf '{"server": {"host": "127.0.0.1", "port": %s, "workers": 1}, "store": {"type": "memory"}}\n' \
      "$port" >"$work/config.yaml"
    set -- "$python" -m coupon.server --config "$work/config.yaml"
  fi
  (cd "$tree" && PYTHONHASHSEED=0 exec valgrind --tool=callgrind \
    --callgrind-out-file="$work/callgrind.out" "$@") >"$work/server.log" 2>&1 &
  pid=$!
  for _ in $(seq 600); do  # under valgrind, start-up takes seconds: poll readiness
    curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break
    kill -0 "$pid" 2>/dev/null || { cat "$work/server.log" >&2; exit 1; }
    sleep 0.2
  done
  campaign=echo-campaign
  if [ "$path" != echo ]; then
    total=10000000
    [ "$path" = soldout ] && total=1
    campaign=$(curl -sf -H 'Content-Type: application/json' \
      -d "{\"name\": \"count\", \"total\": $total}" \
      "http://127.0.0.1:$port/coupon.CouponService/CreateCampaign" |
      "$python" -c 'import json, sys; print(json.load(sys.stdin)["campaignId"])')
  fi
  printf '{"campaignId": "%s"}' "$campaign" >"$work/body.json"
  for count in 200 "$n"; do
    h2load --h1 -n "$count" -c 16 -d "$work/body.json" -H 'Content-Type: application/json' \
      "http://127.0.0.1:$port/coupon.CouponService/IssueCoupon" >"$work/h2load.txt"
  done
  grep -q "$n succeeded\|non-2xx\|4xx" "$work/h2load.txt" || { cat "$work/h2load.txt" >&2; exit 1; }
  kill -TERM "$pid"
  wait "$pid" || true
  grep -oP 'Collected : \K[0-9]+' "$work/server.log"
}

small=$(run_once "$calls")
large=$(run_once $((3 * calls)))
echo "$path ($tree): $(((large - small) / (2 * calls))) instructions per call"
