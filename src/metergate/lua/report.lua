-- report: cut one usage window of one partition into `usage.reported` events, once per pair.
--
-- The admission script aggregates usage per window (see metergate.worker.keys): the window hash
-- holds, per (customer, metric) pair, `q<US>c<US>m` units, `o<US>c<US>m` overage units,
-- `c<US>c<US>m` credits charged and `p<US>c<US>m` the period start (epoch ms), with <US> = \31.
-- A reported pair keeps only its marker `r<US>c<US>m`, so usage that arrives late for it (a
-- gateway whose clock lags) is carried into a window that is still open instead of being
-- reported twice under the same id. Once every pair is reported the hash is deleted and the
-- window joins the reported set; late usage for a reported window is carried whole.
--
-- KEYS: 1 window hash, 2 open windows zset (member window start ms, score window end ms),
--       3 reported windows zset (member and score window start ms), 4 partition outbox,
--       5 carry window hash (the window late usage moves to),
--       then one customer hash per pair (mode 'pairs'),
--       then per pair its hourly and its daily usage history hash (mode 'pairs').
-- ARGV: 1 now (epoch ms), 2 window start ms, 3 window end ms, 4 carry window start ms,
--       5 carry window end ms, 6 reported-set retention ms, 7 mode ('pairs' | 'finish'),
--       8 pair count k, then k times: customer, metric.
-- Units: quantities in the metric's unit, credits in the balance's minor unit, times epoch ms.
-- Reply: {'reported', n} (mode pairs: events emitted), {'done'} / {'more'} (mode finish: the
--   window is closed / still holds unreported pairs), {'carried', n} (late usage moved),
--   {'stale'} (the carry window was already reported: call again with a newer one).

local US = '\31'

local now, ws, we = int(ARGV[1]), int(ARGV[2]), int(ARGV[3])
local cws, cwe, keep = int(ARGV[4]), int(ARGV[5]), int(ARGV[6])
local mode, k = ARGV[7], int(ARGV[8])
if not (now and ws and we and cws and cwe and keep and k) then
  return bad('arguments', 'not integers')
end
local win, open, done, outbox, carry = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]

-- The dashboard's usage history: units per bucket (hour or UTC day) of one asset in a small hash
-- (field: bucket number since the epoch), keeping the last `keep` buckets; field `lo` is the
-- oldest bucket that may still be there, so trimming deletes each old field once.
local function add_history(key, bucket, keep, bucket_ms, units)
  local lo = tonumber(redis.call('HGET', key, 'lo') or '') or bucket
  local cut = bucket - keep
  if cut - lo >= keep then
    -- nothing was added for longer than the history keeps: every field is older than `cut`
    redis.call('DEL', key)
  else
    for b = lo, cut do redis.call('HDEL', key, fmt(b)) end
  end
  redis.call('HINCRBY', key, fmt(bucket), units)
  redis.call('HSET', key, 'lo', fmt(math.max(math.min(lo, bucket), cut + 1)))
  redis.call('PEXPIRE', key, keep * bucket_ms)
end

local function carry_fields(prefix_fields)
  -- prefix_fields: list of {field, value}; moves q/o/c sums and the period start to the carry window
  if redis.call('ZSCORE', done, ARGV[4]) then return false end
  for _, fv in ipairs(prefix_fields) do
    local kind = string.sub(fv[1], 1, 1)
    if kind == 'p' then
      redis.call('HSET', carry, fv[1], fv[2])
    elseif kind == 'q' or kind == 'o' or kind == 'c' then
      redis.call('HINCRBY', carry, fv[1], fv[2])
    end
  end
  redis.call('ZADD', open, cwe, ARGV[4])
  return true
end

-- The whole window was reported already: everything in it arrived late.
if redis.call('ZSCORE', done, ARGV[2]) then
  local flat = redis.call('HGETALL', win)
  local moved = {}
  for i = 1, #flat, 2 do
    if string.sub(flat[i], 1, 1) ~= 'r' then moved[#moved + 1] = {flat[i], flat[i + 1]} end
  end
  if #moved > 0 and cws <= ws then return {'stale'} end
  if #moved > 0 and not carry_fields(moved) then return {'stale'} end
  redis.call('DEL', win)
  redis.call('ZREM', open, ARGV[2])
  return {'carried', fmt(#moved)}
end

if mode == 'finish' then
  local names = redis.call('HKEYS', win)
  for i = 1, #names do
    if string.sub(names[i], 1, 1) ~= 'r' then return {'more'} end
  end
  redis.call('DEL', win)
  redis.call('ZREM', open, ARGV[2])
  redis.call('ZADD', done, ws, ARGV[2])
  redis.call('ZREMRANGEBYSCORE', done, '-inf', '(' .. fmt(ws - keep))
  return {'done'}
end

if mode ~= 'pairs' then return bad('mode', 'must be pairs or finish') end
if cws <= ws then return bad('carry', 'must start after the window') end
local ws_iso, we_iso = iso_utc(ws), iso_utc(we)
local emitted = 0
for i = 1, k do
  local customer, metric = ARGV[7 + 2 * i], ARGV[8 + 2 * i]
  local pair = customer .. US .. metric
  local h = redis.call('HMGET', win, 'q' .. US .. pair, 'o' .. US .. pair, 'c' .. US .. pair,
    'p' .. US .. pair, 'r' .. US .. pair)
  if h[1] or h[2] or h[3] then
    if h[5] then
      local late = {}
      local names = {'q', 'o', 'c', 'p'}
      for j = 1, 4 do
        if h[j] then late[#late + 1] = {names[j] .. US .. pair, h[j]} end
      end
      if not carry_fields(late) then return {'stale'} end
    else
      local ps = int(h[4] or '')
      emit_as(outbox, KEYS[5 + i], customer, now, 'usage.reported',
        'usage:' .. id_part(customer) .. ':' .. id_part(metric) .. ':' .. fmt(math.floor(ws / 1000)),
        {{'metric', metric, 's'}, {'window_start', ws_iso, 's'}, {'window_end', we_iso, 's'},
          {'quantity', tonumber(h[1] or '0'), 'i'}, {'overage_quantity', tonumber(h[2] or '0'), 'i'},
          {'credits_charged', tonumber(h[3] or '0'), 'i'},
          {'period_start', ps and iso_utc(ps) or '', 's'}})
      emitted = emitted + 1
      redis.call('HSET', win, 'r' .. US .. pair, '1')
      local units = tonumber(h[1] or '0')
      if units > 0 then
        add_history(KEYS[5 + k + 2 * i - 1], math.floor(ws / 3600000), 48, 3600000, units)
        add_history(KEYS[5 + k + 2 * i], math.floor(ws / 86400000), 62, 86400000, units)
      end
    end
    redis.call('HDEL', win, 'q' .. US .. pair, 'o' .. US .. pair, 'c' .. US .. pair,
      'p' .. US .. pair)
  end
end
return {'reported', fmt(emitted)}
