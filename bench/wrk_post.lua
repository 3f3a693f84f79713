-- wrk script of bench/served.py: POST one fixed body; print one JSON line of results.
--
--   WRK_BODY_FILE=body.bin WRK_CONTENT_TYPE='multipart/form-data; boundary=...' \
--     wrk -t1 -c64 -d10s --timeout 30s -s bench/wrk_post.lua http://127.0.0.1:PORT/log-likelihood
--
-- The body is read once from WRK_BODY_FILE (a multipart/form-data body with one PNG part,
-- or a JSON {"images": ["<base64>"]} body), sent with WRK_CONTENT_TYPE. Status codes are
-- counted per thread and summed in done(); latencies (of every answer, whatever its status)
-- come from wrk's own histogram, in microseconds.

local body_file = os.getenv("WRK_BODY_FILE")
local content_type = os.getenv("WRK_CONTENT_TYPE") or "application/octet-stream"
local handle = assert(io.open(body_file, "rb"), "WRK_BODY_FILE must name a readable file")
wrk.method = "POST"
wrk.body = handle:read("*a")
handle:close()
wrk.headers["Content-Type"] = content_type

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  statuses = {}
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local counts = {}
  for _, thread in ipairs(threads) do
    local seen = thread:get("statuses")
    if seen then
      for code, n in pairs(seen) do
        counts[code] = (counts[code] or 0) + n
      end
    end
  end
  local parts = {}
  for code, n in pairs(counts) do
    table.insert(parts, string.format('"%d":%d', code, n))
  end
  local e = summary.errors
  io.write(string.format(
    'JSON:{"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"mean":%.1f,"max":%d,"p50":%d,"p95":%d,"p99":%d},"statuses":{%s}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.max, latency:percentile(50), latency:percentile(95), latency:percentile(99),
    table.concat(parts, ",")))
end
