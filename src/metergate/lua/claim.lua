-- claim: take one pending outbox entry for a delivery pass, unless another worker is on it.
--
-- The consumer group's pending list is the lock: the owner of an entry may always take it again,
-- anyone else only once it has been idle for `min idle` (its owner crashed, or merely waits for
-- a retry). Claiming resets the idle time, so a second claimer is refused for the next `min idle`.
--
-- KEYS: 1 partition outbox stream, 2 retry zset.
-- ARGV: 1 group, 2 consumer, 3 stream id, 4 min idle ms.
-- Reply: {'ok', stream id, field, value, ...} (the entry); {'busy', owner}; {'gone'} (not pending:
--   acknowledged or deleted; its retry schedule entry is dropped).

local min_idle = int(ARGV[4])
if not min_idle then return bad('min idle', 'not an integer') end
local stream, retries, group, me, sid = KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3]

local p = redis.call('XPENDING', stream, group, sid, sid, 1)
if #p == 0 then
  redis.call('ZREM', retries, sid)
  return {'gone'}
end
if p[1][2] ~= me and p[1][3] < min_idle then return {'busy', p[1][2]} end
local claimed = redis.call('XCLAIM', stream, group, me, 0, sid)
if #claimed == 0 or not claimed[1] or not claimed[1][2] then
  redis.call('XACK', stream, group, sid)
  redis.call('ZREM', retries, sid)
  return {'gone'}
end
local reply = {'ok', sid}
local fields = claimed[1][2]
for i = 1, #fields do reply[#reply + 1] = fields[i] end
return reply
