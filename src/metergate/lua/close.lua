-- close: emit `period.closed` for an asset whose period ended without an admission after it.
--
-- The admission script closes a period itself when the first admission of the next period rolls
-- the asset over; this script covers assets with no traffic after the boundary. Both write the
-- asset's `cps` (closed period start), so each period is closed exactly once, whoever comes first.
-- The asset hash fields read here: ps and pe (the period's bounds, epoch ms), v (value), ovg
-- (overage units), crd (credits charged in the period), peak (Gauge), cps.
--
-- KEYS: 1 closing zset (member customer<US>metric, score period end ms), 2 partition outbox,
--       3 customer hash, 4 asset hash.
-- ARGV: 1 now (epoch ms), 2 customer, 3 metric, 4 period start ms the caller saw,
--       5 metric type (C, T, G), 6 grace ms (a period closes once `now >= pe + grace`).
-- Reply: {'closed', event id} when emitted now; {'done'} when the period was closed already;
--   {'moved'} when the asset rolled over meanwhile (its admission closed the period);
--   {'open', pe} when the period has not ended plus grace; {'gone'} when nothing is due.

local now, seen, grace = int(ARGV[1]), int(ARGV[4]), int(ARGV[6])
if not now or not seen or not grace then return bad('arguments', 'not integers') end
local closing, outbox, cust_key, akey = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local customer, metric, kind = ARGV[2], ARGV[3], ARGV[5]
local member = customer .. '\31' .. metric

if not redis.call('ZSCORE', closing, member) then return {'gone'} end
local h = redis.call('HMGET', akey, 'ps', 'pe', 'v', 'ovg', 'crd', 'peak', 'cps')
local ps, pe = int(h[1] or ''), int(h[2] or '')
if not ps or not pe then
  redis.call('ZREM', closing, member)
  return {'gone'}
end
if ps ~= seen then return {'moved'} end
if h[7] == fmt(ps) then
  redis.call('ZREM', closing, member)
  return {'done'}
end
if now < pe + grace then
  redis.call('ZADD', closing, pe, member)
  return {'open', fmt(pe)}
end

local fields = {{'metric', metric, 's'}, {'period_start', iso_utc(ps), 's'},
  {'period_end', iso_utc(pe), 's'}, {'value', tonumber(h[3] or '0'), 'i'},
  {'overage', tonumber(h[4] or '0'), 'i'}, {'credits_charged', tonumber(h[5] or '0'), 'i'}}
if kind == 'G' then fields[#fields + 1] = {'peak', tonumber(h[6] or '0'), 'i'} end
local id = emit_as(outbox, cust_key, customer, now, 'period.closed',
  'period:' .. id_part(customer) .. ':' .. id_part(metric) .. ':' .. fmt(math.floor(ps / 1000)), fields)
redis.call('HSET', akey, 'cps', fmt(ps))
redis.call('ZREM', closing, member)
return {'closed', id}
