-- deliver: record the outcome of one delivery pass over an outbox entry, for every destination.
--
-- Each destination's state is 'ok', 'dead' or 'retry:<attempts>:<next attempt ms>'. A destination
-- that becomes dead copies the entry to the dead-letter stream (once: a destination already dead
-- is not copied again). While any destination waits for a retry the entry stays pending and is
-- scheduled in the retry zset at the earliest next attempt; otherwise it is acknowledged and its
-- state deleted. An entry is never acknowledged before every destination is ok or dead.
--
-- KEYS: 1 partition outbox stream, 2 the entry's delivery state hash, 3 retry zset,
--       4 dead-letter stream.
-- ARGV: 1 group, 2 stream id, 3 now (epoch ms), 4 dead-letter max length, 5 state ttl (s),
--       6 destination count n, then n times: destination id, state, reason (why it is dead, or '').
-- Reply: {'done'} (acknowledged) or {'pending', next attempt ms}.

local now, maxlen, ttl, n = int(ARGV[3]), int(ARGV[4]), int(ARGV[5]), int(ARGV[6])
if not now or not maxlen or not ttl or not n then return bad('arguments', 'not integers') end
local stream, state_key, retries, dead = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local group, sid = ARGV[1], ARGV[2]

-- Validate every state before the first write.
local next_at = nil
local dests = {}
for i = 1, n do
  local id, state, reason = ARGV[4 + 3 * i], ARGV[5 + 3 * i], ARGV[6 + 3 * i]
  if state ~= 'ok' and state ~= 'dead' then
    local at = int(string.match(state, '^retry:%d+:(%d+)$') or '')
    if not at then return bad('state', 'malformed for ' .. id) end
    if not next_at or at < next_at then next_at = at end
  end
  dests[i] = {id = id, state = state, reason = reason}
end

local entry = nil
for i = 1, n do
  local d = dests[i]
  if d.state == 'dead' and redis.call('HGET', state_key, d.id) ~= 'dead' then
    if entry == nil then
      local rows = redis.call('XRANGE', stream, sid, sid)
      entry = {}
      if #rows == 1 then entry = rows[1][2] end
    end
    local args = {'XADD', dead, 'MAXLEN', '~', fmt(maxlen), '*'}
    for j = 1, #entry do args[#args + 1] = entry[j] end
    for _, x in ipairs({'destination', d.id, 'reason', d.reason, 'source', sid,
      'dead_at', fmt(now)}) do
      args[#args + 1] = x
    end
    redis.call(unpack(args))
  end
  redis.call('HSET', state_key, d.id, d.state)
end

if next_at then
  redis.call('EXPIRE', state_key, ttl)
  redis.call('ZADD', retries, next_at, sid)
  return {'pending', fmt(next_at)}
end
redis.call('XACK', stream, group, sid)
redis.call('DEL', state_key)
redis.call('ZREM', retries, sid)
return {'done'}
