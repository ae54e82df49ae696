-- customer: create or update a customer's entitlement; bumps its version so gateways that cached
-- the previous entitlement see the change on their next admission.
--
-- KEYS: 1 customer hash.
-- ARGV: 1 plan, 2 anchor (ISO 8601, '' = calendar), 3 timezone, 4 only-if-missing (1/0).
-- Reply: strings: '1' when written ('0' when it existed and only-if-missing was set), version.

local key = KEYS[1]
if ARGV[4] == '1' and redis.call('HEXISTS', key, 'plan') == 1 then
  return {'0', redis.call('HGET', key, 'ver')}
end
redis.call('HSET', key, 'plan', ARGV[1], 'anchor', ARGV[2], 'tz', ARGV[3])
local ver = redis.call('HINCRBY', key, 'ver', 1)
return {'1', fmt(ver)}
