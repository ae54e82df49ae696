-- Shared helpers, prepended to every script by metergate.storage.scripts (Lua 5.1, plain EVAL).
-- Numbers are doubles: every integer read from ARGV or a hash goes through `int`, which rejects
-- NaN, infinities, fractions and magnitudes beyond 2^53 - 1 before anything is written.

local MAX_SAFE = 9007199254740991

local function bad(field, why)
  return redis.error_reply('ERR invalid ' .. field .. ': ' .. why)
end

-- Parse a decimal integer; returns nil for anything that is not a safe integer.
local function int(s)
  if type(s) ~= 'string' or not string.match(s, '^%-?%d+$') then return nil end
  local n = tonumber(s)
  if n == nil or n ~= n or n > MAX_SAFE or n < -MAX_SAFE then return nil end
  return n
end

-- The cheaper check for the arguments the gateway builds from its validated config (tiers,
-- periods): still no NaN, infinity, fraction or unsafe magnitude, without a pattern match per
-- argument (which cost a third of an admission). Amounts always go through `int`.
-- (`n % 1` is NaN for NaN and the infinities, and 0 only for whole numbers.)
local function num(s)
  local n = tonumber(s)
  if n == nil or n % 1 ~= 0 or n > MAX_SAFE or n < -MAX_SAFE then return nil end
  return n
end

local sformat = string.format
local function fmt(n)
  return sformat('%d', n)
end

-- A name inside a stable event id (`usage:`, `period:`), escaped as keys escape it (core/names.py
-- key_part): `%`, `:`, `{`, `}`. The `:` joining an id's parts is then never a name's own, so
-- customer `a:b` on metric `c` and customer `a` on metric `b:c` never share an id.
local ID_ESCAPES = {['%'] = '%25', [':'] = '%3A', ['{'] = '%7B', ['}'] = '%7D'}
local function id_part(name)
  return (string.gsub(name, '[%%:{}]', ID_ESCAPES))
end

local function hint(key, field)
  local v = redis.call('HGET', key, field)
  if not v then return 0 end
  return tonumber(v)
end

-- JSON without cjson's 14-digit number formatting: callers pass {name, value, kind} triples,
-- kind 'i' for integers, 's' for strings, 'r' for raw JSON.
local function json(fields)
  local parts = {}
  for i = 1, #fields do
    local f = fields[i]
    local v
    if f[3] == 'i' then v = fmt(f[2])
    elseif f[3] == 'r' then v = f[2]
    else v = cjson.encode(f[2]) end
    parts[#parts + 1] = cjson.encode(f[1]) .. ':' .. v
  end
  return '{' .. table.concat(parts, ',') .. '}'
end

-- Append one event to the customer's partition outbox with the customer's next sequence number.
-- `id` is caller-chosen and stable (`usage:...`, `period:...`) or nil for an event that happens
-- once. Both carry the deployment's id (a ULID chosen once and kept in storage, copied to the
-- customer hash as `dep`), so two deployments never share an id: `usage:<dep>:<customer>:...`,
-- and `evt_<dep>_<customer>_<seq>`.
local function emit_as(outbox, cust_key, customer, now, etype, id, fields)
  local seq = redis.call('HINCRBY', cust_key, 'seq', 1)
  local dep = redis.call('HGET', cust_key, 'dep')
  if id and dep then
    local colon = string.find(id, ':', 1, true)
    id = string.sub(id, 1, colon) .. dep .. ':' .. string.sub(id, colon + 1)
  elseif not id then
    id = 'evt_' .. (dep and (dep .. '_') or '') .. customer .. '_' .. fmt(seq)
  end
  table.insert(fields, 1, {'customer', customer, 's'})
  fields[#fields + 1] = {'seq', seq, 'i'}
  redis.call('XADD', outbox, '*', 'id', id, 'type', etype, 'customer', customer,
    'time', fmt(now), 'data', json(fields))
  return id
end

local function emit(outbox, cust_key, customer, now, etype, fields)
  return emit_as(outbox, cust_key, customer, now, etype, nil, fields)
end

-- RFC 3339 (UTC, whole seconds) of an epoch-ms instant: days to civil date (H. Hinnant).
local function iso_utc(ms)
  local s = math.floor(ms / 1000)
  local days = math.floor(s / 86400)
  local rem = s - days * 86400
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp + 3
  if mp >= 10 then m = mp - 9 end
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return string.format('%04d-%02d-%02dT%02d:%02d:%02dZ', y, m, d,
    math.floor(rem / 3600), math.floor((rem % 3600) / 60), rem % 60)
end

-- The ledger keeps its newest 10,000 lines. What a trim drops is carried, not lost: one line of
-- kind `carried` per balance at the tail holds the sum of the dropped deltas (the `initial` line
-- included), so `amount == sum of the ledger's deltas` stays checkable from storage alone.
local function push_line(ledger_key, line)
  local length = redis.call('LPUSH', ledger_key, line)
  -- trimmed in batches of 100, not on every entry
  if length <= 10100 then return end
  local sums, names = {}, {}
  local last = 0
  for _, row in ipairs(redis.call('LRANGE', ledger_key, 9999, -1)) do
    local e = cjson.decode(row)
    local name = e.balance
    if sums[name] == nil then
      sums[name] = 0
      names[#names + 1] = name
    end
    sums[name] = sums[name] + e.delta
    if e.time > last then last = e.time end
  end
  redis.call('LTRIM', ledger_key, 0, 9998)
  table.sort(names)
  for _, name in ipairs(names) do
    redis.call('RPUSH', ledger_key, string.format(
      '{"op":"carried","kind":"carried","balance":%s,"delta":%s,"time":%s}',
      cjson.encode(name), fmt(sums[name]), fmt(last)))
  end
end

-- Usage charges add up per usage report window in the balance hash (uw window start ms, ud delta,
-- un count, ut time, ua amount and uh held after the last charge) and become one ledger line of
-- kind `usage` when the window changes or before any other line of the balance: one line per
-- window instead of one per request, and the sum of the deltas is the same.
local function flush_usage(ledger_key, bkey, name)
  local u = redis.call('HMGET', bkey, 'uw', 'ud', 'un', 'ut', 'ua', 'uh')
  if not u[1] then return end
  push_line(ledger_key, string.format(
    '{"op":"usage:%s","kind":"usage","balance":%s,"delta":%s,"amount":%s,"held":%s,"time":%s,'
    .. '"count":%s,"window":%s}', u[1], cjson.encode(name), u[2], u[5], u[6], u[4], u[3], u[1]))
  redis.call('HDEL', bkey, 'uw', 'ud', 'un', 'ut', 'ua', 'uh')
end

-- One ledger line of a balance (after its pending usage line); a format string builds it.
local function ledger(ledger_key, bkey, now, op, kind, balance, delta, amount, held)
  flush_usage(ledger_key, bkey, balance)
  push_line(ledger_key, string.format(
    '{"op":%s,"kind":"%s","balance":%s,"delta":%s,"amount":%s,"held":%s,"time":%s}',
    cjson.encode(op), kind, cjson.encode(balance), fmt(delta), fmt(amount), fmt(held), fmt(now)))
end

-- Release every hold on a balance whose expiry has passed, exactly once (ZREM decides who won),
-- emitting reservation.expired. Returns the balance's held amount afterwards.
local function expire_holds(bkey, bxkey, name, now, outbox, cust_key, customer, ledger_key)
  local held = hint(bkey, 'held')
  local due = redis.call('ZRANGEBYSCORE', bxkey, '-inf', now)
  for i = 1, #due do
    local rid = due[i]
    if redis.call('ZREM', bxkey, rid) == 1 then
      local amount = tonumber(redis.call('HGET', bkey, 'h:' .. rid) or '0')
      redis.call('HDEL', bkey, 'h:' .. rid)
      held = held - amount
      redis.call('HSET', bkey, 'held', fmt(held))
      ledger(ledger_key, bkey, now, rid, 'expire', name, 0, hint(bkey, 'amt'), held)
      emit(outbox, cust_key, customer, now, 'reservation.expired',
        {{'balance', name, 's'}, {'reservation', rid, 's'}, {'amount', amount, 'i'}})
    end
  end
  return held
end

-- Keep a balance in its partition's index of open holds, scored by its earliest expiry, so a
-- sweeper finds expired holds of balances nobody touches (out of the index once it has none).
local function index_holds(holds_key, bxkey, member)
  local first = redis.call('ZRANGE', bxkey, 0, 0, 'WITHSCORES')
  if first[2] then
    redis.call('ZADD', holds_key, first[2], member)
  else
    redis.call('ZREM', holds_key, member)
  end
end

-- Balance lifecycle events for a move of `available` from `before` to `after`; `overage` and
-- `low` are the balance's settings (`low` false or '' when unset).
local function balance_events(name, before, after, overage, low, outbox, cust_key, customer, now)
  local floor = -overage
  if low and low ~= '' then
    low = tonumber(low)
    if before >= low and after < low then
      emit(outbox, cust_key, customer, now, 'balance.low',
        {{'balance', name, 's'}, {'amount', after, 'i'}, {'floor', floor, 'i'}})
    end
  end
  if before > 0 and after <= 0 then
    emit(outbox, cust_key, customer, now, 'balance.depleted',
      {{'balance', name, 's'}, {'amount', after, 'i'}, {'floor', floor, 'i'}})
  end
  if before >= floor and after < floor then
    emit(outbox, cust_key, customer, now, 'balance.overdrawn',
      {{'balance', name, 's'}, {'amount', after, 'i'}, {'floor', floor, 'i'}})
  end
end

-- Idempotency: the stored record is "<fingerprint>\31<reply fields joined by \31>".
local function split(s)
  local out = {}
  for part in string.gmatch(s, '([^\31]*)\31?') do out[#out + 1] = part end
  if out[#out] == '' then out[#out] = nil end
  return out
end

local function replay(op_key, fingerprint)
  if op_key == '' then return nil end
  local stored = redis.call('GET', op_key)
  if not stored then return nil end
  local parts = split(stored)
  if parts[1] ~= fingerprint then
    return {'409', 'idempotency-conflict'}
  end
  table.remove(parts, 1)
  return parts
end

local function remember(op_key, fingerprint, ttl, reply)
  if op_key == '' then return end
  redis.call('SET', op_key, fingerprint .. '\31' .. table.concat(reply, '\31'), 'EX', ttl)
end
