-- wrk script for scripts/bench.py: POST IssueCoupon for one campaign, as Connect JSON or, with
-- "proto" after the campaign id, as Connect binary protobuf.
-- Usage: wrk -t2 -c64 -d10s -s scripts/wrk/issue.lua \
--          http://127.0.0.1:8080/coupon.CouponService/IssueCoupon -- <campaign-id> [json|proto]
-- At the end it prints one line "BENCH_JSON {...}" that bench.py parses (latency in µs).

function init(args)
  local campaign_id = args[1] or ""
  wrk.method = "POST"
  if args[2] == "proto" then
    -- IssueCouponRequest{campaign_id}: field 1, length-delimited (a UUID is under 128 bytes).
    wrk.headers["Content-Type"] = "application/proto"
    wrk.body = string.char(0x0a, #campaign_id) .. campaign_id
  else
    wrk.headers["Content-Type"] = "application/json"
    wrk.body = '{"campaignId":"' .. campaign_id .. '"}'
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"non2xx":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"timeout":%d,"p50_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
