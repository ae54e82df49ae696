-- balance: one operation on one prepaid balance, applied exactly once per operation id.
--
-- KEYS: 1 operation record, 2 partition outbox stream, 3 customer hash, 4 customer ledger list,
--       5 balance hash, 6 hold expiry zset, 7 the partition's index of balances with holds.
-- ARGV: 1 now (epoch ms), 2 operation id, 3 fingerprint, 4 operation record ttl (s), 5 customer,
--       6 operation (create, topup, withdraw, suspend, resume, reserve, commit, release, read),
--       7 balance name, 8 amount, 9 reservation id, 10 reservation expiry (epoch ms),
--       11 unit, 12 overage, 13 low_at ('' = none), 14 only-if-missing ('1' leaves an existing
--       balance's settings alone; absent or '0' updates them) (11-14: create only).
--       Operation `cancel` (a reservation whose reply was lost) takes that reservation's
--       operation record as KEYS[1].
-- Amounts are integers of the balance's minor unit; `available = amount - held`.
-- Reply: strings: status ('200', '402', '403', '404', '409'), problem slug, amount, held,
--   available, overage, suspended (0/1), unit, low_at ('' none), the amount the operation moved,
--   and for reserve the hold's expiry (epoch ms).
-- The fingerprint covers every parameter (the caller includes the reservation id and ttl), so the
-- same operation id with anything else is a 409 conflict, decided here, atomically.
-- Malformed arguments get the error reply 'invalid <field>: <why>' before anything is written.

local now, ttl, amount, expiry = int(ARGV[1]), int(ARGV[4]), int(ARGV[8]), int(ARGV[10])
local op_id, fp, customer, op, name, rid = ARGV[2], ARGV[3], ARGV[5], ARGV[6], ARGV[7], ARGV[9]
local outbox, cust_key, ledger_key, bkey, bxkey = KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local known = {create = true, topup = true, withdraw = true, suspend = true, resume = true,
  reserve = true, commit = true, release = true, read = true, cancel = true}
local positive = {topup = true, withdraw = true, reserve = true}
local holds = {reserve = true, commit = true, release = true, cancel = true}
if not now then return bad('now', 'must be an integer of epoch ms') end
if not ttl or ttl < 1 then return bad('ttl', 'must be a positive integer of seconds') end
if not expiry then return bad('expiry', 'must be an integer of epoch ms') end
if not known[op] then return bad('operation', 'unknown operation ' .. op) end
if not amount or amount < 0 then return bad('amount', 'must be a non-negative safe integer') end
if positive[op] and amount == 0 then return bad('amount', 'must be greater than 0') end
if holds[op] and rid == '' then return bad('reservation', 'must not be empty') end
if op == 'reserve' and expiry <= now then return bad('expiry', 'must be later than now') end
if op == 'create' then
  local ovg, low = int(ARGV[12]), int(ARGV[13])
  if not ovg or ovg < 0 then return bad('overage', 'must be a non-negative safe integer') end
  if ARGV[13] ~= '' and (not low or low < 0) then
    return bad('low_at', 'must be a non-negative safe integer')
  end
end

-- cancel: undo a reservation whose reply was lost. KEYS[1] is then that reservation's operation
-- record: a tombstone there makes the reservation, should it arrive later, a conflict that holds
-- nothing; if it already ran, its hold is released.
if op == 'cancel' then
  if redis.call('SET', KEYS[1], 'void', 'NX', 'EX', ttl) then
    return {'200', 'voided', '0', '0', '0', '0', '0', '', '', '0'}
  end
  op = 'release'
  KEYS[1] = ''
else
  local prior = replay(KEYS[1], fp)
  if prior then return prior end
end

local exists = redis.call('EXISTS', bkey) == 1
local status, slug, moved = '200', '', 0

if op == 'create' then
  if not exists then
    redis.call('HSET', bkey, 'amt', fmt(amount), 'held', '0', 'susp', '0')
    ledger(ledger_key, bkey, now, op_id, 'initial', name, amount, amount, 0)
    moved = amount
  end
  if not exists or ARGV[14] ~= '1' then
    redis.call('HSET', bkey, 'unit', ARGV[11], 'ovg', ARGV[12], 'low', ARGV[13])
  end
  exists = true
elseif not exists then
  return {'404', 'not-found'}
end

-- Refuse an overflowing top-up before the first write (the expiry sweep below writes).
if op == 'topup' and hint(bkey, 'amt') + amount > MAX_SAFE then
  return bad('amount', 'the balance would exceed 2^53 - 1')
end

local held = expire_holds(bkey, bxkey, name, now, outbox, cust_key, customer, ledger_key)
local amt, ovg = hint(bkey, 'amt'), hint(bkey, 'ovg')
local susp = redis.call('HGET', bkey, 'susp') == '1'
local before = amt - held

local function close_hold()
  if redis.call('ZREM', bxkey, rid) ~= 1 then return nil end
  local h = tonumber(redis.call('HGET', bkey, 'h:' .. rid) or '0')
  redis.call('HDEL', bkey, 'h:' .. rid)
  held = held - h
  return h
end

if op == 'topup' then
  amt = amt + amount
  moved = amount
  ledger(ledger_key, bkey, now, op_id, 'topup', name, amount, amt, held)
  emit(outbox, cust_key, customer, now, 'balance.topped_up',
    {{'balance', name, 's'}, {'amount', amount, 'i'}, {'balance_after', amt, 'i'}})
elseif op == 'withdraw' then
  -- overage is credit for usage, never for withdrawals
  if before - amount < 0 then
    status, slug = '409', 'insufficient-credits'
  else
    amt = amt - amount
    moved = amount
    ledger(ledger_key, bkey, now, op_id, 'withdraw', name, -amount, amt, held)
    emit(outbox, cust_key, customer, now, 'balance.withdrawn',
      {{'balance', name, 's'}, {'amount', amount, 'i'}, {'balance_after', amt, 'i'}})
  end
elseif op == 'suspend' or op == 'resume' then
  local want = op == 'suspend'
  if susp ~= want then
    susp = want
    local flag = '0'
    if want then flag = '1' end
    redis.call('HSET', bkey, 'susp', flag)
    ledger(ledger_key, bkey, now, op_id, op, name, 0, amt, held)
    local etype = 'balance.resumed'
    if want then etype = 'balance.suspended' end
    emit(outbox, cust_key, customer, now, etype, {{'balance', name, 's'}})
  end
elseif op == 'reserve' then
  if redis.call('HEXISTS', bkey, 'h:' .. rid) == 1 then
    -- reusing a live hold's id would overwrite it and leave its amount held forever
    status, slug = '409', 'reservation-exists'
  elseif susp then
    status, slug = '403', 'balance-suspended'
  elseif before - amount < -ovg then
    status, slug = '402', 'insufficient-credits'
  else
    held = held + amount
    moved = amount
    redis.call('HSET', bkey, 'h:' .. rid, fmt(amount))
    redis.call('ZADD', bxkey, expiry, rid)
    ledger(ledger_key, bkey, now, rid, 'hold', name, 0, amt, held)
  end
elseif op == 'commit' then
  local h = close_hold()
  if not h then
    status, slug = '409', 'reservation-closed'
  else
    amt = amt - amount
    moved = amount
    ledger(ledger_key, bkey, now, op_id, 'commit', name, -amount, amt, held)
  end
elseif op == 'release' then
  local h = close_hold()
  if not h then
    status, slug = '409', 'reservation-closed'
  else
    moved = h
    ledger(ledger_key, bkey, now, op_id, 'release', name, 0, amt, held)
  end
end

redis.call('HSET', bkey, 'amt', fmt(amt), 'held', fmt(held))
balance_events(name, before, amt - held, hint(bkey, 'ovg'), redis.call('HGET', bkey, 'low'),
  outbox, cust_key, customer, now)
if KEYS[7] then index_holds(KEYS[7], bxkey, customer .. '\31' .. name) end

local sflag = '0'
if susp then sflag = '1' end
local reply = {status, slug, fmt(amt), fmt(held), fmt(amt - held), fmt(ovg), sflag,
  redis.call('HGET', bkey, 'unit') or '', redis.call('HGET', bkey, 'low') or '', fmt(moved)}
-- a reservation's expiry travels with its reply, so a replay returns the first one
if op == 'reserve' then reply[#reply + 1] = fmt(expiry) end
if status == '200' and op ~= 'read' and op ~= 'create' then remember(KEYS[1], fp, ttl, reply) end
return reply
