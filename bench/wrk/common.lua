-- Shared by every scenario: one connection per wrk thread, so a thread's globals are that
-- connection's state (a refresh chain). done() prints one JSON line the harness parses.
local threads = {}
local counter = 0

function setup(thread)
  counter = counter + 1
  thread:set("index", counter)
  table.insert(threads, thread)
end

broken = 0

function done(summary, latency, requests)
  local lost = 0
  for _, thread in ipairs(threads) do
    lost = lost + (thread:get("broken") or 0)
  end
  local e = summary.errors
  io.write(string.format(
    'JSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,'
      .. '"connect":%d,"read":%d,"write":%d,"timeout":%d,"status":%d,"broken":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, e.connect, e.read, e.write, e.timeout, e.status, lost))
end

-- A refresh-token chain per connection: this thread's share of the tokens file, the first in
-- use, the rest spares. A non-200 breaks the chain: it is counted, and a spare takes over.
function load_chain(path, threads)
  local tokens = {}
  for line in io.lines(path) do
    table.insert(tokens, line)
  end
  local per_thread = math.floor(#tokens / threads)
  spares = {}
  for i = 1, per_thread do
    table.insert(spares, tokens[(index - 1) * per_thread + i])
  end
  token = table.remove(spares, 1)
end

function follow_chain(status, body)
  local next_token = status == 200 and body:match('"refresh_token":"([^"]+)"')
  if next_token then
    token = next_token
  else
    broken = broken + 1
    token = table.remove(spares, 1) or token
  end
end
