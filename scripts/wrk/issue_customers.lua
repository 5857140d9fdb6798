-- wrk script for scripts/bench.py: IssueCoupon for one campaign, each call as a customer.
-- Usage: wrk -t2 -c64 -d10s -s scripts/wrk/issue_customers.lua \
--          http://127.0.0.1:8080/coupon.CouponService/IssueCoupon -- <campaign-id> <file> <mode>
-- <file> holds one customer per line, "<userId> <JWT>". Mode "jwt" sends the customer's token
-- (Authorization: Bearer), mode "userid" sends the same customer's userId in the body instead,
-- so the two rows differ only by the token's verification. The threads walk the list from
-- different offsets and wrap around, as customers retry.
-- At the end it prints one line "BENCH_JSON {...}" that bench.py parses (latency in µs).

local thread_count = 0

function setup(thread)
  thread:set("offset", thread_count)
  thread_count = thread_count + 1
end

function init(args)
  campaign, mode = args[1], args[3]
  users, tokens = {}, {}
  for line in io.lines(args[2]) do
    local user, token = line:match("^(%S+) (%S+)$")
    users[#users + 1], tokens[#tokens + 1] = user, token
  end
  index = (offset or 0) * 7919 % #users
  headers = {["Content-Type"] = "application/json"}
end

function request()
  index = index % #users + 1
  if mode == "jwt" then
    headers["Authorization"] = "Bearer " .. tokens[index]
    return wrk.format("POST", nil, headers, '{"campaignId":"' .. campaign .. '"}')
  end
  return wrk.format("POST", nil, headers,
    '{"campaignId":"' .. campaign .. '","userId":"' .. users[index] .. '"}')
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"non2xx":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"timeout":%d,"p50_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
