-- trim: drop delivered outbox entries older than the retention, never an undelivered one.
--
-- Undelivered means pending in the group (read, not yet acknowledged) or not read yet (after the
-- group's last-delivered id), so the cut is the lowest of the oldest pending id, the successor of
-- the last-delivered id and the retention cut (by Redis's clock, which also stamps the ids).
-- A stream trims from its start only: a delivered
-- entry newer than a pending one stays until that one is done. Also forgets consumers with
-- nothing pending that have been idle for longer than `consumer idle` (every restarted worker
-- joins under a new name).
--
-- KEYS: 1 partition outbox stream.
-- ARGV: 1 group, 2 retention ms (delivered entries younger than this stay), 3 consumer idle ms.
-- Reply: {entries trimmed, consumers deleted}.

local retention, idle_limit = int(ARGV[2]), int(ARGV[3])
if not retention or not idle_limit then return bad('arguments', 'not integers') end
local stream, group = KEYS[1], ARGV[1]
if redis.call('EXISTS', stream) == 0 then return {'0', '0'} end

local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function lower(a_ms, a_seq, b_ms, b_seq)
  if a_ms < b_ms or (a_ms == b_ms and a_seq < b_seq) then return a_ms, a_seq end
  return b_ms, b_seq
end

local last = nil
local groups = redis.call('XINFO', 'GROUPS', stream)
for i = 1, #groups do
  local g = groups[i]
  local info = {}
  for j = 1, #g, 2 do info[g[j]] = g[j + 1] end
  if info['name'] == group then last = info['last-delivered-id'] end
end
if not last then return {'0', '0'} end

local cut_ms, cut_seq = parse(last)
cut_seq = cut_seq + 1
local summary = redis.call('XPENDING', stream, group)
if summary[1] > 0 then
  local p_ms, p_seq = parse(summary[2])
  cut_ms, cut_seq = lower(cut_ms, cut_seq, p_ms, p_seq)
end
local clock = redis.call('TIME')
local keep_from = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000) - retention
cut_ms, cut_seq = lower(cut_ms, cut_seq, keep_from, 0)
local trimmed = 0
if cut_ms > 0 then
  trimmed = redis.call('XTRIM', stream, 'MINID', fmt(cut_ms) .. '-' .. fmt(cut_seq))
end

local deleted = 0
local consumers = redis.call('XINFO', 'CONSUMERS', stream, group)
for i = 1, #consumers do
  local c = consumers[i]
  local info = {}
  for j = 1, #c, 2 do info[c[j]] = c[j + 1] end
  if info['pending'] == 0 and info['idle'] > idle_limit then
    redis.call('XGROUP', 'DELCONSUMER', stream, group, info['name'])
    deleted = deleted + 1
  end
end
return {fmt(trimmed), fmt(deleted)}
