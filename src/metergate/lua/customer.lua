-- customer: create or update a customer's entitlement; bumps its version so gateways that cached
-- the previous entitlement see the change on their next admission. Also keeps the entitlement
-- history (`hist`: a JSON list of [plan, anchor, timezone, since ms], oldest first, the last
-- HISTORY_MAX changes) and the deployment's id (`dep`), which event ids carry.
--
-- KEYS: 1 customer hash.
-- ARGV: 1 plan, 2 anchor (ISO 8601, '' = calendar), 3 timezone, 4 only-if-missing (1/0),
--       5 now ms, 6 the deployment's id.
-- Reply: strings: '1' when written ('0' when it existed and only-if-missing was set), version.

local HISTORY_MAX = 100
local key = KEYS[1]
local plan, anchor, tz, now, dep = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[5]), ARGV[6]

local function remember(p, a, z)
  local raw = redis.call('HGET', key, 'hist')
  local hist = raw and cjson.decode(raw) or {}
  local last = hist[#hist]
  if last and last[1] == p and last[2] == a and last[3] == z then return end
  hist[#hist + 1] = {p, a, z, fmt(now)}
  while #hist > HISTORY_MAX do table.remove(hist, 1) end
  redis.call('HSET', key, 'hist', cjson.encode(hist))
end

if dep ~= '' then redis.call('HSET', key, 'dep', dep) end
if ARGV[4] == '1' and redis.call('HEXISTS', key, 'plan') == 1 then
  if redis.call('HEXISTS', key, 'hist') == 0 then
    local h = redis.call('HMGET', key, 'plan', 'anchor', 'tz')
    remember(h[1], h[2] or '', h[3] or 'UTC')
  end
  return {'0', redis.call('HGET', key, 'ver')}
end
redis.call('HSET', key, 'plan', plan, 'anchor', anchor, 'tz', tz)
remember(plan, anchor, tz)
local ver = redis.call('HINCRBY', key, 'ver', 1)
return {'1', fmt(ver)}
