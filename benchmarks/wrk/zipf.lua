-- wrk script: every request carries the API key of a customer drawn from Zipf(s) over N customers
-- (rank k, customer k-1, is drawn with probability proportional to 1/k^s), and the run ends with
-- report.lua's `WRKJSON {...}` line.
--
--   wrk -s zipf.lua URL -- N S SEED
--
-- N customers (default 10000), exponent S (default 1.1), SEED (default 1) plus the thread's
-- number seeds each thread, so that every server of a comparison is sent the same sequence.
-- The keys are scenario.customer_key(i): "bench-key-<i>".

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "report.lua")

local threads = 0

function setup(thread)
  thread:set("number", threads)
  threads = threads + 1
end

local cdf, requests

function init(args)
  local n = tonumber(args[1]) or 10000
  local s = tonumber(args[2]) or 1.1
  local seed = tonumber(args[3]) or 1
  math.randomseed(seed + (tonumber(wrk.thread:get("number")) or 0))
  cdf, requests = {}, {}
  local total = 0
  for k = 1, n do
    total = total + k ^ -s
    cdf[k] = total
  end
  for k = 1, n do
    cdf[k] = cdf[k] / total
    local headers = { Authorization = "Bearer bench-key-" .. (k - 1) }
    requests[k] = wrk.format("GET", wrk.path, headers)
  end
  cdf[n] = 1.0
end

function request()
  local u = math.random()
  local lo, hi = 1, #cdf
  while lo < hi do -- the first rank whose cumulative probability reaches u
    local mid = math.floor((lo + hi) / 2)
    if cdf[mid] < u then
      lo = mid + 1
    else
      hi = mid
    end
  end
  return requests[lo]
end
