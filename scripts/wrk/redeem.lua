-- wrk script for scripts/bench.py: POST RedeemCoupon (Connect JSON), each request a fresh code.
-- Usage: wrk -t2 -c64 -d10s -s scripts/wrk/redeem.lua \
--          http://127.0.0.1:8080/coupon.CouponService/RedeemCoupon -- <codes file> <threads>
-- The codes file holds one issued, unredeemed code per line; thread k of n sends codes
-- k+1, k+1+n, ... Past the end it wraps around with new order ids, so a run that outlasts its
-- codes shows up as refusals (ALREADY_REDEEMED), never as inflated redemptions.
-- At the end it prints one line "BENCH_JSON {...}" that bench.py parses (latency in µs).

local next_thread = 0

function setup(thread)
  thread:set("id", next_thread)
  next_thread = next_thread + 1
end

local codes = {}
local position, step = 1, 1

function init(args)
  for line in io.lines(args[1]) do
    codes[#codes + 1] = line
  end
  step = tonumber(args[2]) or 1
  position = (id or 0) + 1
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  local n = position
  position = position + step
  local code = codes[((n - 1) % #codes) + 1]
  local body = '{"code":"' .. code .. '","orderId":"bench-' .. n .. '"}'
  return wrk.format(nil, nil, nil, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"non2xx":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"timeout":%d,"p50_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
