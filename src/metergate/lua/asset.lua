-- asset: read, suspend or resume one monitored asset (customer, metric).
--
-- KEYS: 1 partition outbox stream, 2 customer hash, 3 asset hash, 4 asset expiry zset.
-- ARGV: 1 now (epoch ms), 2 customer, 3 operation (read, suspend, resume), 4 metric,
--       5 type (C, T, G, U), 6 reason (for the event).
-- Reply: strings: period start ms (-1 = never written), value, pending (unexpired holds only),
--   level index, overage, suspended (0/1), peak, last total.

local now = int(ARGV[1])
if not now then return bad('now', 'not an integer') end
local customer, op, metric, kind = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local outbox, cust_key, akey, axkey = KEYS[1], KEYS[2], KEYS[3], KEYS[4]

local susp = redis.call('HGET', akey, 'susp') == '1'
if op == 'suspend' and not susp then
  redis.call('HSET', akey, 'susp', '1')
  emit(outbox, cust_key, customer, now, 'asset.suspended',
    {{'metric', metric, 's'}, {'reason', ARGV[6], 's'}})
  susp = true
elseif op == 'resume' and susp then
  redis.call('HSET', akey, 'susp', '0')
  emit(outbox, cust_key, customer, now, 'asset.resumed',
    {{'metric', metric, 's'}, {'reason', ARGV[6], 's'}})
  susp = false
end

-- Holds and leases past their expiry no longer count, whether or not a sweep has run.
local v, pend = hint(akey, 'v'), 0
local live = redis.call('ZRANGEBYSCORE', axkey, '(' .. fmt(now), '+inf')
local dead = redis.call('ZRANGEBYSCORE', axkey, '-inf', now)
for i = 1, #live do pend = pend + tonumber(redis.call('HGET', akey, 'x:' .. live[i]) or '0') end
if kind == 'U' then
  for i = 1, #dead do v = v - tonumber(redis.call('HGET', akey, 'x:' .. dead[i]) or '0') end
  pend = 0
end
local sflag = '0'
if susp then sflag = '1' end
return {redis.call('HGET', akey, 'ps') or '-1', fmt(v), fmt(pend), fmt(hint(akey, 'lvl')),
  fmt(hint(akey, 'ovg')), sflag, fmt(hint(akey, 'peak')), fmt(hint(akey, 'last'))}
