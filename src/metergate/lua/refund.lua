-- refund: undo one admission exactly once, or make sure it never happens.
--
-- KEYS: 1 the attempt's undo record (written by admit.lua), 2 the operation record of a keyed
--       admission (KEYS[1] again when it has none), 3 partition outbox stream, 4 customer hash,
--       5 customer ledger list, then per asset of the record: asset hash, asset expiry zset,
--       then per balance of the record: balance hash, hold expiry zset,
--       then the usage window hash of the record's window, the open usage windows zset and the
--       partition's index of balances with open holds.
-- ARGV: 1 now (epoch ms), 2 tombstone ttl (s), 3 customer, 4 asset count n, 5 balance count m,
--       then n metric names and m balance names, in the record's order (n = m = 0 when the
--       caller found no record).
-- Units: amounts in the metric's unit, credits in the balance's minor unit.
-- Reply: {'refunded', credits returned} the admission is undone; {'void'} it had not happened:
--   a tombstone now stops it if it arrives later; {'done'} already refunded (or voided);
--   {'stale'} the record's assets or balances differ from the keys given (read it and retry).
-- What is undone: the units in the period counters (when the period is still the same), the
--   overage, the credits charged in the period, the tiers' base flags it set, its units in the
--   usage window (when not yet reported), the balance charge (a ledger line of kind `refund`),
--   its holds and its leases. RateLimit throttles are left alone: a throttle counts attempts.

local now, ttl, n, m = int(ARGV[1]), int(ARGV[2]), int(ARGV[4]), int(ARGV[5])
if not now or not ttl or ttl < 1 or not n or not m or n < 0 or m < 0 then
  return bad('header', 'now, ttl and counts must be integers')
end
local customer = ARGV[3]
local undo_key, op_key, outbox, cust_key, ledger_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]

local rec = redis.call('GET', undo_key)
if not rec then
  redis.call('SET', undo_key, 'void', 'EX', ttl)
  return {'void'}
end
local f = split(rec)
if f[1] ~= 'done' then return {'done'} end
local rid, ws = f[2], f[3]
local rn = tonumber(f[4])
local q = 5
local assets = {}
for i = 1, rn do
  assets[i] = {metric = f[q], kind = f[q + 1], mode = f[q + 2], ps = f[q + 3],
    d = tonumber(f[q + 4]), ovg = tonumber(f[q + 5]), charge = tonumber(f[q + 6]),
    bases = f[q + 7], x = tonumber(f[q + 8])}
  q = q + 9
end
local rm = tonumber(f[q])
q = q + 1
local bal = {}
for j = 1, rm do
  bal[j] = {name = f[q], charge = tonumber(f[q + 1]), hold = tonumber(f[q + 2])}
  q = q + 3
end
if rn ~= n or rm ~= m then return {'stale'} end
for i = 1, n do
  if ARGV[5 + i] ~= assets[i].metric then return {'stale'} end
  assets[i].key, assets[i].xkey = KEYS[4 + 2 * i], KEYS[5 + 2 * i]
end
for j = 1, m do
  if ARGV[5 + n + j] ~= bal[j].name then return {'stale'} end
  bal[j].key, bal[j].xkey = KEYS[4 + 2 * n + 2 * j], KEYS[5 + 2 * n + 2 * j]
end
local uw_key, uw_open, holds_index = KEYS[6 + 2 * n + 2 * m], KEYS[7 + 2 * n + 2 * m],
  KEYS[8 + 2 * n + 2 * m]

local window_open = redis.call('ZSCORE', uw_open, ws) ~= false
for i = 1, n do
  local a = assets[i]
  local h = redis.call('HMGET', a.key, 'ps', 'v', 'ovg', 'crd', 'pend', 'xn')
  local w = {}
  local v, pend, xn = tonumber(h[2] or '0'), tonumber(h[5] or '0'), tonumber(h[6] or '0')
  -- units of a period that has closed since stay in it: period.closed has reported them
  if a.d > 0 and h[1] == a.ps then
    v = math.max(0, v - a.d)
    w[#w + 1], w[#w + 2] = 'v', fmt(v)
    if a.ovg > 0 then
      w[#w + 1], w[#w + 2] = 'ovg', fmt(math.max(0, tonumber(h[3] or '0') - a.ovg))
    end
    if a.charge > 0 then
      w[#w + 1], w[#w + 2] = 'crd', fmt(math.max(0, tonumber(h[4] or '0') - a.charge))
    end
    for k in string.gmatch(a.bases, '[^,]+') do
      if redis.call('HGET', a.key, 'base' .. k) == a.ps then redis.call('HDEL', a.key, 'base' .. k) end
    end
  end
  if a.d > 0 and window_open then
    local pair = customer .. '\31' .. a.metric
    if redis.call('HEXISTS', uw_key, 'q\31' .. pair) == 1 then
      redis.call('HINCRBY', uw_key, 'q\31' .. pair, -a.d)
      if a.ovg > 0 then redis.call('HINCRBY', uw_key, 'o\31' .. pair, -a.ovg) end
      if a.charge > 0 then redis.call('HINCRBY', uw_key, 'c\31' .. pair, -a.charge) end
    end
  end
  -- the hold of an estimate, or the lease of an UpDownCounter, unless it ended or expired
  if a.x > 0 and redis.call('ZREM', a.xkey, rid) == 1 then
    local x = tonumber(redis.call('HGET', a.key, 'x:' .. rid) or '0')
    redis.call('HDEL', a.key, 'x:' .. rid)
    if a.kind == 'U' then
      v = v - x
      w[#w + 1], w[#w + 2] = 'v', fmt(v)
    else
      w[#w + 1], w[#w + 2] = 'pend', fmt(pend - x)
    end
    w[#w + 1], w[#w + 2] = 'xn', fmt(xn - 1)
  end
  if #w > 0 then redis.call('HSET', a.key, unpack(w)) end
end

local returned = 0
for j = 1, m do
  local b = bal[j]
  local h = redis.call('HMGET', b.key, 'amt', 'held')
  if h[1] then
    local amt, held = tonumber(h[1]), tonumber(h[2] or '0')
    local released = false
    if b.hold > 0 and redis.call('ZREM', b.xkey, rid) == 1 then
      held = held - tonumber(redis.call('HGET', b.key, 'h:' .. rid) or '0')
      redis.call('HDEL', b.key, 'h:' .. rid)
      released = true
    end
    if b.charge > 0 or released then
      amt = amt + b.charge
      returned = returned + b.charge
      redis.call('HSET', b.key, 'amt', fmt(amt), 'held', fmt(held))
      ledger(ledger_key, b.key, now, rid, 'refund', b.name, b.charge, amt, held)
    end
    if released then index_holds(holds_index, b.xkey, customer .. '\31' .. b.name) end
  end
end

redis.call('SET', undo_key, 'refunded', 'KEEPTTL')
-- a keyed request whose charge was refunded is metered as new when retried
if op_key ~= undo_key then redis.call('DEL', op_key) end
return {'refunded', returned}
