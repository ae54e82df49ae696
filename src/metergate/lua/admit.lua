-- admit: decide and record one atomic batch of asset operations for one customer, all or nothing.
--
-- KEYS: 1 operation record, 2 partition outbox stream, 3 customer hash, 4 customer ledger list,
--       then per asset i: asset hash, asset expiry zset (pending holds and leases),
--       then per balance j: balance hash, hold expiry zset,
--       then the partition's usage window hash, open usage windows zset and closing zset,
--       then the partition's index of balances with open holds,
--       then the attempt's undo record (what a refund undoes; any key of the slot without one).
-- ARGV: 1 now (epoch ms), 2 operation id, 3 fingerprint, 4 operation record ttl (s), 5 customer,
--       6 entitlement version ('' = do not check), 7 hold/lease id, 8 hold expiry (epoch ms, for
--       estimates and their balance holds), 9 lease expiry (epoch ms, for UpDownCounter admissions),
--       10 asset count n, 11 balance count m, then m balance names,
--       then per asset: metric, type (C cumulative, T total, G gauge, U up-down),
--         mode (a admit, e estimate-hold, r record, s settle a hold, x end a lease, g grant an
--         allowance: see below), amount,
--         period start ms, period end ms (0 = none), period start RFC 3339, period end RFC 3339,
--         balance index (0 = none), tier count k, tier flags (one character per tier: 'b' when
--         it has a base price, 'r' when it is a RateLimit tier, 'x' both, '-' neither), then the
--         k tiers' `from`, then per tier one argument of its other fields, separated by spaces:
--         level index, policy (N notify, O overage, G grace, R rate limit, D deny, S suspend),
--         grace, rate limit, rate period ms, price per_unit, price per, price base
--         (e.g. '0 N 0 1 1000 1 1 0'; only the tiers a value reaches are parsed);
--       then the usage window's start ms and end ms (windows of `usage_report_interval`),
--       then the attempt id ('' = no undo record: settlements and records).
-- Units: amounts are integers of the metric's unit; prices integers of the balance's minor unit.
-- Reply: strings: status ('200', '402', '403', '409', '429', or 'stale' when the entitlement
--   version changed), problem slug, retry-after ms (-1 none), index of the refused asset (0 none),
--   n, per asset: value, pending, level index, tier index, overage, throttle remaining (-1 none),
--   suspended (0/1); then m, per balance: available, amount, held.
--   {'void'} when a refund of this attempt came first (its client was answered 503); {'dup',
--   hold id} when this attempt was already applied (a degraded request recorded twice).
-- Undo record (see refund.lua), fields joined by \31: 'done', hold id, usage window start,
--   n, per asset: metric, type, mode, period start, units added, overage added, credits
--   charged, tiers whose base it charged (comma-separated), units held or leased; then m, per
--   balance: name, credits charged, credits held.
-- A grant (every asset in mode 'g', ARGV 3 = the number of requests wanted, each of `amount`
--   units) holds as an estimate the most requests, up to that number, that keep every asset
--   inside its current tier (never past the next tier's `from`, a grace end, or into a tier whose
--   entry would change a level, charge a base, refuse or suspend) and every balance above its
--   floor. Its reply is an admission's, with the number granted in the retry-after place and
--   each balance's credits held by this grant in the place of its total held;
--   status 'none' when not one request fits: that admission goes per request (slug 'period'
--   when it is the first of a period).
-- Facts (T and G records, settlements, lease ends) are never refused: their consequences
-- (levels, suspension, charges, even past a balance's floor) are recorded.
-- A SuspendUsage crossing suspends its asset only when nothing else refuses the admission: a
-- request refused anyway (another asset suspended, over quota or throttled) would not have crossed.
-- A settlement is checked from the value without its own estimate, which it replaces.

-- The header and tiers come from the gateway's validated config: `num` (no pattern match) is
-- enough for them; amounts, which come from requests, go through `int`.
local now = num(ARGV[1])
if not now then return bad('now', 'not an integer') end
local op_id, fp, customer, ver, rid = ARGV[2], ARGV[3], ARGV[5], ARGV[6], ARGV[7]
local ttl, hold_exp, lease_exp = num(ARGV[4]), num(ARGV[8]), num(ARGV[9])
local n, m = num(ARGV[10]), num(ARGV[11])
if not ttl or not hold_exp or not lease_exp or not n or not m or n < 1 or m < 0 then
  return bad('header', 'ttl, expiries and counts must be integers, with at least one asset')
end
local outbox, cust_key, ledger_key = KEYS[2], KEYS[3], KEYS[4]
local undo_key, attempt = KEYS[9 + 2 * n + 2 * m], ARGV[#ARGV]

-- A refund that arrived before its admission left a tombstone: the admission never happens.
if attempt ~= '' and undo_key then
  local rec = redis.call('GET', undo_key)
  if rec then
    if string.sub(rec, 1, 4) == 'void' then return {'void'} end
    -- the hold id the attempt was applied under, for settling what it left open
    return {'dup', split(rec)[2] or ''}
  end
end

-- An empty operation id means the caller will never retry: no record is kept or read.
if op_id ~= '' then
  local prior = replay(KEYS[1], fp)
  if prior then return prior end
end
if ver ~= '' and redis.call('HGET', cust_key, 'ver') ~= ver then return {'stale'} end

-- Parse and validate everything before the first write: Redis has no rollback.
-- Codes are checked by comparison (no lookup table is built per call); the names are looked up
-- only for an event.
local function is_kind(c) return c == 'C' or c == 'T' or c == 'G' or c == 'U' end
local function is_mode(c)
  return c == 'a' or c == 'e' or c == 'r' or c == 's' or c == 'x' or c == 'g'
end
local function is_policy(c)
  return c == 'N' or c == 'O' or c == 'G' or c == 'R' or c == 'D' or c == 'S'
end

local p = 12
local bal = {}
for j = 1, m do
  -- every field the admission sets is named here, so the table is sized once
  bal[j] = {name = ARGV[p], key = KEYS[4 + 2 * n + 2 * j - 1], xkey = KEYS[4 + 2 * n + 2 * j],
    charge = 0, hold = 0, exists = false, amt = 0, held = 0, ovg = 0, susp = false, low = false,
    uw = false, ud = 0, un = 0, expired = false, settles = false, used = false}
  p = p + 1
end
-- Tiers are read lazily: every `from` up front (they place a value in a tier), the first tier
-- whole, and the others only when a value reaches them, so an admission that stays in one tier
-- pays for one tier whatever the plan's length. `ensure_tiers` parses every tier the admission
-- can touch before the first write, so a malformed tier still changes nothing.
local TIER = '^(%-?%d+) (%u) (%-?%d+) (%-?%d+) (%-?%d+) (%-?%d+) (%-?%d+) (%-?%d+)$'
local function parse_tier(a, k)
  local level, policy, grace, limit, per, pu, pper, base =
    string.match(ARGV[a.tp + a.nt + k - 1] or '', TIER)
  if level then
    level, grace, limit, per = tonumber(level), tonumber(grace), tonumber(limit), tonumber(per)
    pu, pper, base = tonumber(pu), tonumber(pper), tonumber(base)
  end
  -- whole numbers by the pattern; num's other checks inline
  if not level or grace > MAX_SAFE or grace < -MAX_SAFE or pu > MAX_SAFE or pu < -MAX_SAFE
    or base > MAX_SAFE or base < -MAX_SAFE or limit > MAX_SAFE or per > MAX_SAFE
    or pper > MAX_SAFE or pper < 1 or limit < 1 or per < 1 or not is_policy(policy)
    or level < 0 or level > 3 then
    return bad('tier', 'malformed tier ' .. k .. ' for ' .. a.metric)
  end
  -- the flags told which per-tier state to load: they must agree with the tier itself
  local flag = '-'
  if base > 0 then flag = 'b' end
  if policy == 'R' then
    if flag == 'b' then flag = 'x' else flag = 'r' end
  end
  if string.sub(a.flags, k, k) ~= flag then
    return bad('tier', 'flags disagree with tier ' .. k .. ' for ' .. a.metric)
  end
  a.tiers[k] = {from = a.froms[k], level = level, policy = policy, grace = grace, limit = limit,
    per = per, pu = pu, pper = pper, base = base}
  return nil
end

local function tier_of(a, v)
  local froms = a.froms
  if a.nt == 1 or v <= froms[2] then return 1 end -- the common case
  local k = 1
  for i = 2, a.nt do
    if froms[i] < v then k = i else break end
  end
  return k
end

local function ensure_tiers(a, upto)
  for k = 2, upto do
    if not a.tiers[k] then
      local err = parse_tier(a, k)
      if err then return err end
    end
  end
  return nil
end

local assets = {}
local NONE = {} -- never written: see `stateful` below
local grant = false
for i = 1, n do
  -- The fields every admission sets are named here (32: the table is sized once); the period's
  -- RFC 3339 bounds stay in ARGV (p + 6, p + 7) until an event needs them. An asset without
  -- per-tier state shares one empty table for it.
  local flags = ARGV[p + 10]
  local tat, tats, base_flags, base_set = NONE, NONE, NONE, NONE
  if string.find(flags, '[brx]') then tat, tats, base_flags, base_set = {}, {}, {}, {} end
  local a = {metric = ARGV[p], kind = ARGV[p + 1], mode = ARGV[p + 2], amount = int(ARGV[p + 3]),
    ps = num(ARGV[p + 4]), pe = num(ARGV[p + 5]), bi = num(ARGV[p + 8]), nt = num(ARGV[p + 9]),
    flags = flags, key = KEYS[3 + 2 * i], xkey = KEYS[4 + 2 * i], tiers = {}, froms = {},
    tat = tat, charge = 0, tp = p + 11, crd = 0, w = false, xn = 0, base_flags = base_flags,
    base_set = base_set, tats = tats, v = 0, pend = 0, lvl = 0, stored_lvl = false, ovg = 0,
    susp = false, stored_ps = 0, d = 0, ovg_added = false, charged = false}
  if not a.amount then return bad('amount', 'not a safe integer for ' .. a.metric) end
  if not a.ps or not a.pe or not a.bi or not a.nt or a.nt < 1 or a.bi < 0 or a.bi > m
    or not is_kind(a.kind) or not is_mode(a.mode) or #a.flags ~= a.nt
    or string.find(a.flags, '[^-brx]') then
    return bad('asset', 'malformed arguments for ' .. a.metric)
  end
  if i == 1 then grant = a.mode == 'g' end
  if (a.mode == 'g') ~= grant or (grant and a.kind ~= 'C' and a.kind ~= 'T') then
    return bad('asset', 'a grant takes counters only, and every asset of the call')
  end
  local signed = (a.kind == 'U' and a.mode == 'r')
  if a.amount < 0 and not signed then return bad('amount', 'negative for ' .. a.metric) end
  p = a.tp
  local froms = a.froms
  for k = 1, a.nt do
    local from = tonumber(ARGV[p + k - 1])
    if not from or from % 1 ~= 0 or from > MAX_SAFE or from < -MAX_SAFE
      or (k > 1 and from <= froms[k - 1]) then
      return bad('tier', 'malformed tier ' .. k .. ' for ' .. a.metric)
    end
    froms[k] = from
  end
  local err = parse_tier(a, 1)
  if err then return err end
  p = p + 2 * a.nt
  assets[i] = a
end
local want = 0
if grant then
  want = num(fp)
  if not want or want < 1 or op_id ~= '' then
    return bad('grant', 'the number of requests wanted must be a positive integer, without an operation id')
  end
end
local uw_key, uw_open, closing = KEYS[5 + 2 * n + 2 * m], KEYS[6 + 2 * n + 2 * m],
  KEYS[7 + 2 * n + 2 * m]
local holds_index = KEYS[8 + 2 * n + 2 * m]
local uw_start, uw_end = num(ARGV[p]), num(ARGV[p + 1])
if not closing or not uw_start or not uw_end then
  return bad('usage window', 'keys or bounds missing')
end

local function units_in(froms, k, v)
  local lo = froms[k]
  local u = v - lo
  if u < 0 then return 0 end
  local nxt = froms[k + 1]
  if nxt and v > nxt then u = nxt - lo end
  return u
end

-- ceil(u * pu / per) without forming a product beyond 2^53: split u into whole `per` blocks.
local function cost(u, pu, per)
  local whole = math.floor(u / per)
  local rest = u - whole * per
  return whole * pu + math.ceil(rest * pu / per)
end

-- Credits for moving the recorded value from `v0` to `v1`, with the base of each tier entered for
-- the first time this period (flags are set only when `commit_base`). Only the tiers the units
-- enter can change: below them both values fill the tier, above them neither reaches it.
local function price(a, v0, v1, commit_base)
  if v1 <= v0 then return 0 end
  local total, froms = 0, a.froms
  for k = tier_of(a, v0 + 1), tier_of(a, v1) do
    local t = a.tiers[k]
    local u0, u1 = units_in(froms, k, v0), units_in(froms, k, v1)
    if u1 > u0 then
      total = total + cost(u1, t.pu, t.pper) - cost(u0, t.pu, t.pper)
      if t.base > 0 and u1 > 0 and a.base_flags[k] ~= a.ps then
        total = total + t.base
        if commit_base then a.base_set[#a.base_set + 1] = k end
      end
    end
  end
  return total
end

local function awo_units(a, v0, v1)
  if v1 <= v0 then return 0 end
  local total, froms = 0, a.froms
  for k = tier_of(a, v0 + 1), tier_of(a, v1) do
    if a.tiers[k].policy == 'O' then
      total = total + units_in(froms, k, v1) - units_in(froms, k, v0)
    end
  end
  return total
end

local function retry_to_end(a)
  if a.kind == 'U' then return 1000 end
  if a.kind == 'G' or a.pe == 0 then return -1 end
  return a.pe - now
end

-- Check the tiers that units moving the value from `before` to `after` would enter.
-- Returns status, slug, retry-after ms for a refusal; records a SuspendUsage crossing in a.suspend.
local function evaluate(a, before, after, facts)
  if after <= before then return nil end
  local k1, k2 = tier_of(a, before + 1), tier_of(a, after)
  for k = k1, k2 do
    local t = a.tiers[k]
    local pol = t.policy
    if pol == 'S' and after > t.from then
      a.suspend = k
      if not facts then return '403', 'asset-suspended', -1 end
    elseif not facts then
      if pol == 'D' and after > t.from then
        return '429', 'quota-exceeded', retry_to_end(a)
      elseif pol == 'G' and after > t.from + t.grace then
        return '429', 'quota-exceeded', retry_to_end(a)
      elseif pol == 'R' then
        local hi = after
        local nxt = a.froms[k + 1]
        if nxt and hi > nxt then hi = nxt end
        local u = hi - math.max(before, t.from)
        local interval = t.per / t.limit
        local tat = math.max(a.tats[k], now)
        local new_tat = tat + u * interval
        local over = new_tat - now - t.limit * interval
        if over > 1e-6 then
          if u > t.limit then return '429', 'rate-limited', -1 end
          return '429', 'rate-limited', math.ceil(over)
        end
        a.tat[k] = new_tat
      end
    end
  end
  return nil
end

-- Load each asset's state for the current period, and find its expired holds and leases.
-- Nothing is written until every tier the admission can reach has been parsed.
for i = 1, n do
  local a = assets[i]
  -- One read of the whole state: the fields every kind keeps, `last` and `peak` for the kinds
  -- that keep them (TotalCounter, Gauge), then the base flag and throttle of the tiers that have
  -- them (their flags say which).
  local stateful = a.tat ~= NONE
  local kept = a.kind == 'T' or a.kind == 'G'
  local h
  if not stateful and not kept then
    h = redis.call('HMGET', a.key, 'ps', 'v', 'pend', 'lvl', 'ovg', 'susp', 'xn', 'crd')
  else
    local fields = {'ps', 'v', 'pend', 'lvl', 'ovg', 'susp', 'xn', 'crd', 'last', 'peak'}
    if stateful then
      for k = 1, a.nt do
        fields[#fields + 1] = 'base' .. k
        fields[#fields + 1] = 'tat' .. k
      end
    end
    h = redis.call('HMGET', a.key, unpack(fields))
  end
  a.crd = tonumber(h[8] or '0') -- credits charged in the period, for period.closed
  a.w = {}
  a.xn = tonumber(h[7] or '0')
  if stateful then
    for k = 1, a.nt do
      a.base_flags[k] = tonumber(h[9 + 2 * k] or '-1')
      a.tats[k] = tonumber(h[10 + 2 * k] or '0')
    end
  end
  -- A fresh asset (and a new period) starts at the first tier's level: its first unit is no change.
  a.v, a.pend, a.lvl = tonumber(h[2] or '0'), tonumber(h[3] or '0'), a.tiers[1].level
  a.stored_lvl = tonumber(h[4])
  if a.stored_lvl then a.lvl = a.stored_lvl end
  a.ovg, a.susp = tonumber(h[5] or '0'), h[6] == '1'
  -- (a CumulativeCounter or UpDownCounter never uses them)
  if kept then a.last, a.peak = tonumber(h[9] or '0'), tonumber(h[10] or '0') end
  -- `xn` counts the open holds and leases, so an asset without any skips the expiry scan.
  if a.xn > 0 then
    local due = redis.call('ZRANGEBYSCORE', a.xkey, '-inf', now)
    if #due > 0 then a.due = due end
    for d = 1, #due do
      local x = tonumber(redis.call('HGET', a.key, 'x:' .. due[d]) or '0')
      if a.kind == 'U' then a.v = a.v - x else a.pend = a.pend - x end
      a.xn = a.xn - 1
      a.expired = true
    end
  end
  a.stored_ps = tonumber(h[1] or '-1')
  if a.kind == 'C' or a.kind == 'T' or (a.kind == 'G' and a.pe > 0) then
    if a.ps > a.stored_ps then
      a.rollover = true
      a.closing = {v = a.v, ovg = a.ovg, peak = a.peak, crd = a.crd} -- the period being left
      a.crd = 0
      if a.kind ~= 'G' then a.v, a.ovg, a.lvl = 0, 0, a.tiers[1].level end
      a.peak = 0
    elseif a.ps < a.stored_ps then
      a.ps = a.stored_ps -- a gateway with a lagging clock never reopens a closed period
    end
  end
  -- Every value this admission can produce lies at or below `hi`: parse the tiers up to it.
  local hi = a.v + a.pend
  if a.v > hi then hi = a.v end
  if hi < 0 then hi = 0 end
  if a.amount > 0 then hi = hi + a.amount end
  local err = ensure_tiers(a, tier_of(a, hi))
  if err then return err end
end
-- Release the expired holds and leases found above.
for i = 1, n do
  local a = assets[i]
  if a.due then
    for d = 1, #a.due do
      redis.call('ZREM', a.xkey, a.due[d])
      redis.call('HDEL', a.key, 'x:' .. a.due[d])
    end
  end
end
for j = 1, m do
  local b = bal[j]
  local h = redis.call('HMGET', b.key, 'amt', 'held', 'ovg', 'susp', 'low', 'uw', 'ud', 'un')
  b.exists = h[1] ~= false
  b.amt, b.held, b.ovg = tonumber(h[1] or '0'), tonumber(h[2] or '0'), tonumber(h[3] or '0')
  b.susp, b.low = h[4] == '1', h[5]
  b.uw, b.ud, b.un = h[6], tonumber(h[7] or '0'), tonumber(h[8] or '0')
  -- held > 0 exactly when holds are open; only then can one have expired
  if b.held > 0 then
    local was = b.held
    b.held = expire_holds(b.key, b.xkey, b.name, now, outbox, cust_key, customer, ledger_key)
    b.expired = b.held ~= was
  end
end

-- Decide. `status` is the first refusal other than a SuspendUsage crossing; `crossing` the first
-- asset whose units would cross a SuspendUsage `from`.
local status, slug, retry, refused = '200', '', -1, 0

-- A grant: the most requests (up to `want`) that stay in every asset's tier and above every
-- balance's floor. The checks below then see it as one estimate of that many requests' units.
local granted, why = 0, ''
if grant then
  local r = want
  for i = 1, n do
    local a = assets[i]
    local per = a.amount
    local b = a.bi > 0 and bal[a.bi]
    if b and (not b.exists or b.susp) then r = 0 end
    if per > 0 and r > 0 then
      local before = a.v + a.pend
      -- the tier the next unit goes into; its tiers up to one request ahead are parsed above
      local k = tier_of(a, before + 1)
      local t = a.tiers[k]
      if a.rollover then
        r, why = 0, 'period' -- a period's first admission closes the last one: per request
      elseif a.susp or t.level ~= a.lvl
        or (t.policy ~= 'N' and t.policy ~= 'O' and t.policy ~= 'G')
        or (t.base > 0 and a.base_flags[k] ~= a.ps) then
        r = 0
      else
        local room = -1
        local nxt = a.froms[k + 1]
        if nxt then room = nxt - before end
        if t.policy == 'G' and (room < 0 or t.from + t.grace - before < room) then
          room = t.from + t.grace - before
        end
        if room >= 0 and math.floor(room / per) < r then r = math.floor(room / per) end
      end
    end
  end
  local function fits(c)
    local held = {}
    for i = 1, n do
      local a = assets[i]
      if a.bi > 0 then
        local before = a.v + a.pend
        held[a.bi] = (held[a.bi] or 0) + price(a, before, before + c * a.amount, false)
      end
    end
    for j, h in pairs(held) do
      local b = bal[j]
      if h > 0 and b.amt - b.held - h < -b.ovg then return false end
    end
    return true
  end
  if r > 0 and not fits(r) then
    local lo, hi = 0, r - 1
    while lo < hi do
      local mid = math.floor((lo + hi + 1) / 2)
      if fits(mid) then lo = mid else hi = mid - 1 end
    end
    r = lo
  end
  granted = r
  for i = 1, n do
    assets[i].amount = r * assets[i].amount
    assets[i].mode = 'e'
  end
  if r == 0 then status, slug = 'none', why end
end
local crossing = 0
local facts = true
for i = 1, n do
  local a = assets[i]
  local mode, kind = a.mode, a.kind
  local is_fact = mode == 's' or mode == 'x' or (mode == 'r' and (kind == 'T' or kind == 'G'))
  if not is_fact then facts = false end
  -- the recorded delta (d), and the span checked against the tiers (before -> after)
  local d, before, after = 0, a.v + a.pend, a.v + a.pend
  if kind == 'T' and mode == 'r' then
    d = a.amount - a.last
    if a.amount < a.last then d = a.amount end
    after = before + d
  elseif kind == 'G' then
    if mode == 'r' then after = a.amount; before = a.v else after = a.v + a.amount end
  elseif mode == 'x' then
    d = -tonumber(redis.call('HGET', a.key, 'x:' .. rid) or '0')
    after = before + d
  elseif mode == 'e' then
    after = before + a.amount
  elseif mode == 's' then
    -- the actual replaces this settlement's own estimate (already gone if it expired)
    before = before - tonumber(redis.call('HGET', a.key, 'x:' .. rid) or '0')
    d = a.amount
    after = before + d
  else
    d = a.amount
    after = before + d
  end
  a.d = d
  if a.susp and not is_fact then
    if status == '200' then status, slug, refused = '403', 'asset-suspended', i end
  else
    local s, sl, r = evaluate(a, before, after, is_fact)
    if a.suspend and not is_fact then
      if crossing == 0 then crossing = i end
    elseif s and status == '200' then
      status, slug, retry, refused = s, sl, r, i
    end
  end
  if a.bi > 0 and (kind == 'C' or kind == 'T') then
    local b = bal[a.bi]
    if mode == 's' then b.settles = true end
    if mode == 'e' then
      b.hold = b.hold + price(a, before, after, false)
    elseif d > 0 then
      a.charge = price(a, a.v, a.v + d, true)
      b.charge = b.charge + a.charge
    end
    b.used = true
  end
end
local blocked = status ~= '200'
if not blocked and crossing > 0 then
  status, slug, retry, refused = '403', 'asset-suspended', -1, crossing
end
if status == '200' then
  for j = 1, m do
    local b = bal[j]
    if b.used and not b.exists and not facts then
      status, slug = '402', 'insufficient-credits'
    elseif b.used and b.susp and not facts then
      status, slug = '403', 'balance-suspended'
    elseif not facts and b.amt - b.held - b.charge - b.hold < -b.ovg
      and (b.charge > 0 or b.hold > 0) then
      status, slug = '402', 'insufficient-credits'
    end
    if status ~= '200' then break end
  end
end

local function level_event(a, new_v)
  local k = tier_of(a, new_v)
  local lvl = a.tiers[k].level
  if lvl ~= a.lvl then
    local POLICIES = {N = 'NotifyOnly', O = 'AllowWithOverage', G = 'AllowWithGrace',
      R = 'RateLimit', D = 'Deny', S = 'SuspendUsage'}
    local LEVELS = {'Normal', 'Warning', 'Critical', 'OverUsage'}
    local ps, pe = {'period_start', 'null', 'r'}, {'period_end', 'null', 'r'}
    if a.pe > 0 then
      ps, pe = {'period_start', ARGV[a.tp - 5], 's'}, {'period_end', ARGV[a.tp - 4], 's'}
    end
    emit(outbox, cust_key, customer, now, 'quota.level_changed', {
      {'metric', a.metric, 's'}, {'from_level', LEVELS[a.lvl + 1], 's'},
      {'to_level', LEVELS[lvl + 1], 's'}, {'policy', POLICIES[a.tiers[k].policy], 's'},
      {'value', new_v, 'i'}, {'threshold', a.froms[k], 'i'}, ps, pe})
    a.lvl = lvl
  end
end

-- period.closed for the period an asset leaves, once (`cps` is shared with close.lua).
local function close_period(a)
  if a.stored_ps < 0 then return end
  local h = redis.call('HMGET', a.key, 'pe', 'cps')
  if h[2] == fmt(a.stored_ps) then return end
  local fields = {{'metric', a.metric, 's'}, {'period_start', iso_utc(a.stored_ps), 's'},
    {'period_end', iso_utc(tonumber(h[1] or a.ps)), 's'}, {'value', a.closing.v, 'i'},
    {'overage', a.closing.ovg, 'i'}, {'credits_charged', a.closing.crd, 'i'}}
  if a.kind == 'G' then fields[#fields + 1] = {'peak', a.closing.peak, 'i'} end
  emit_as(outbox, cust_key, customer, now, 'period.closed',
    'period:' .. id_part(customer) .. ':' .. id_part(a.metric) .. ':' .. fmt(math.floor(a.stored_ps / 1000)), fields)
  a.w.cps = fmt(a.stored_ps)
end

-- Write: the consequences of a refusal (a suspension), or the whole admission.
for i = 1, n do
  local a = assets[i]
  if a.suspend and not a.susp and not blocked then
    a.susp = true
    a.w.susp = '1'
    emit(outbox, cust_key, customer, now, 'asset.suspended',
      {{'metric', a.metric, 's'}, {'reason', 'SuspendUsage', 's'}})
  end
  if a.expired then
    a.w.pend, a.w.xn = fmt(a.pend), fmt(a.xn)
    if a.kind == 'U' then a.w.v = fmt(a.v) end
  end
end
if status == '200' then
  for i = 1, n do
    local a = assets[i]
    local kind, mode = a.kind, a.mode
    local w = a.w
    if a.rollover then
      close_period(a)
      w.ps, w.v, w.ovg, w.peak = fmt(a.ps), fmt(a.v), '0', '0'
      w.pe, w.crd = fmt(a.pe), '0'
      redis.call('ZADD', closing, a.pe, customer .. '\31' .. a.metric)
    end
    if mode == 'e' then
      a.pend, a.xn = a.pend + a.amount, a.xn + 1
      w.pend, w.xn, w['x:' .. rid] = fmt(a.pend), fmt(a.xn), fmt(a.amount)
      redis.call('ZADD', a.xkey, hold_exp, rid)
    elseif kind == 'G' then
      if mode == 'r' then
        a.v = a.amount
        if a.amount > a.peak then a.peak = a.amount end
        w.v, w.peak, w.ps = fmt(a.v), fmt(a.peak), fmt(a.ps)
        level_event(a, a.v)
      end
    else
      if mode == 's' or mode == 'x' then
        local held = tonumber(redis.call('HGET', a.key, 'x:' .. rid) or '0')
        if redis.call('ZREM', a.xkey, rid) == 1 then
          if mode == 's' then a.pend = a.pend - held end
          a.xn = a.xn - 1
          w.xn = fmt(a.xn)
        end
        redis.call('HDEL', a.key, 'x:' .. rid)
      elseif kind == 'U' and mode == 'a' then
        a.xn = a.xn + 1
        w.xn, w['x:' .. rid] = fmt(a.xn), fmt(a.amount)
        redis.call('ZADD', a.xkey, lease_exp, rid)
      end
      if kind == 'T' and mode == 'r' then w.last = fmt(a.amount) end
      local ovg_added = 0
      if a.d > 0 then
        ovg_added = awo_units(a, a.v, a.v + a.d)
        a.ovg = a.ovg + ovg_added
      end
      a.ovg_added = ovg_added
      -- usage.reported is aggregated here, per window, never by scanning events
      if a.d > 0 and (kind == 'C' or kind == 'T') then
        local pair = customer .. '\31' .. a.metric
        local q = redis.call('HINCRBY', uw_key, 'q\31' .. pair, a.d)
        if ovg_added > 0 then redis.call('HINCRBY', uw_key, 'o\31' .. pair, ovg_added) end
        if a.charge > 0 and bal[a.bi].exists then
          a.charged = a.charge
          redis.call('HINCRBY', uw_key, 'c\31' .. pair, a.charge)
          a.crd = a.crd + a.charge
          w.crd = fmt(a.crd)
        end
        -- The pair's first units in this window open it; a rollover changes its period.
        if q == a.d or a.rollover then
          redis.call('HSET', uw_key, 'p\31' .. pair, fmt(a.ps))
          redis.call('ZADD', uw_open, uw_end, fmt(uw_start))
        end
      end
      a.v = a.v + a.d
      for k, tat in pairs(a.tat) do w['tat' .. k] = string.format('%.17g', tat) end
      for _, k in ipairs(a.base_set) do w['base' .. k] = fmt(a.ps) end
      -- only the fields that changed (a rollover wrote its own above)
      if a.d ~= 0 then w.v = fmt(a.v) end
      if mode == 's' then w.pend = fmt(a.pend) end
      if ovg_added > 0 then w.ovg = fmt(a.ovg) end
      if kind ~= 'U' and a.ps ~= a.stored_ps then w.ps = fmt(a.ps) end
      level_event(a, a.v)
    end
    if a.lvl ~= a.stored_lvl then w.lvl = fmt(a.lvl) end
  end
  for j = 1, m do
    local b = bal[j]
    local before = b.amt - b.held
    if b.exists and b.settles then
      if redis.call('ZREM', b.xkey, rid) == 1 then
        b.held = b.held - tonumber(redis.call('HGET', b.key, 'h:' .. rid) or '0')
        redis.call('HSET', b.key, 'held', fmt(b.held))
        if b.charge == 0 then
          ledger(ledger_key, b.key, now, rid, 'settle', b.name, 0, b.amt, b.held)
        end
      end
      redis.call('HDEL', b.key, 'h:' .. rid)
    end
    if b.exists and (b.charge > 0 or b.hold > 0) then
      b.amt, b.held = b.amt - b.charge, b.held + b.hold
      if b.charge > 0 then
        -- the charge joins the balance's usage line of this window (see flush_usage)
        local ws = fmt(uw_start)
        if b.uw ~= ws then
          if b.uw then flush_usage(ledger_key, b.key, b.name) end
          b.ud, b.un = 0, 0
          -- readers find the balances with a usage line still open here
          redis.call('HSET', cust_key, 'lu:' .. b.name, ws)
        end
        b.ud, b.un = b.ud - b.charge, b.un + 1
        -- `held` and `uw` only when they change (stored `held` is b.held before this hold)
        local amt, held = fmt(b.amt), fmt(b.held)
        if b.hold > 0 and b.uw ~= ws then
          redis.call('HSET', b.key, 'amt', amt, 'ud', fmt(b.ud), 'un', fmt(b.un), 'ut', fmt(now),
            'ua', amt, 'uh', held, 'held', held, 'uw', ws)
        elseif b.hold > 0 then
          redis.call('HSET', b.key, 'amt', amt, 'ud', fmt(b.ud), 'un', fmt(b.un), 'ut', fmt(now),
            'ua', amt, 'uh', held, 'held', held)
        elseif b.uw ~= ws then
          redis.call('HSET', b.key, 'amt', amt, 'ud', fmt(b.ud), 'un', fmt(b.un), 'ut', fmt(now),
            'ua', amt, 'uh', held, 'uw', ws)
        else
          redis.call('HSET', b.key, 'amt', amt, 'ud', fmt(b.ud), 'un', fmt(b.un), 'ut', fmt(now),
            'ua', amt, 'uh', held)
        end
      else
        redis.call('HSET', b.key, 'amt', fmt(b.amt), 'held', fmt(b.held))
      end
      if b.hold > 0 then
        redis.call('HSET', b.key, 'h:' .. rid, fmt(b.hold))
        redis.call('ZADD', b.xkey, hold_exp, rid)
        -- an allowance's hold is not a ledger line: one would be written per grant
        if not grant then ledger(ledger_key, b.key, now, rid, 'hold', b.name, 0, b.amt, b.held) end
      end
      balance_events(b.name, before, b.amt - b.held, b.ovg, b.low, outbox, cust_key, customer, now)
    end
    if holds_index and b.exists and (b.hold > 0 or b.settles or b.expired) then
      index_holds(holds_index, b.xkey, customer .. '\31' .. b.name)
    end
  end
end

-- One write per asset of every field that changed.
for i = 1, n do
  local args = {}
  for f, v in pairs(assets[i].w) do
    args[#args + 1] = f
    args[#args + 1] = v
  end
  if #args > 0 then redis.call('HSET', assets[i].key, unpack(args)) end
end

-- Reply: numbers travel as integer replies (no formatting); the stored copy is strings.
if grant then retry = granted end
local reply = {status, slug, retry, refused, n}
local r = 5
for i = 1, n do
  local a = assets[i]
  local k = tier_of(a, a.v)
  local thr = -1
  local t = a.tiers[k]
  if t.policy == 'R' then
    local interval = t.per / t.limit
    -- a refused admission spent nothing, so its throttle is read from storage
    local tat = status == '200' and a.tat[k]
    if not tat then tat = a.tats[k] end
    thr = math.floor((t.limit * interval - (math.max(tat, now) - now)) / interval + 1e-9)
    if thr < 0 then thr = 0 end
  end
  local susp = 0
  if a.susp then susp = 1 end
  reply[r + 1], reply[r + 2], reply[r + 3], reply[r + 4] = a.v, a.pend, a.lvl, k
  reply[r + 5], reply[r + 6], reply[r + 7] = a.ovg, thr, susp
  r = r + 7
end
reply[r + 1] = m
r = r + 1
for j = 1, m do
  local b = bal[j]
  reply[r + 1], reply[r + 2], reply[r + 3] = b.amt - b.held, b.amt, b.held
  if grant then reply[r + 3] = b.hold end -- what this allowance holds
  r = r + 3
end
-- Only admissions are remembered: a refused request retried later is decided anew.
if status == '200' and op_id ~= '' then
  local stored = {}
  for i = 1, #reply do
    local x = reply[i]
    if type(x) == 'number' then x = fmt(x) end
    stored[i] = x
  end
  remember(KEYS[1], fp, ttl, stored)
end
if status == '200' and attempt ~= '' and undo_key then
  -- built with one format per asset and balance (names joined as they are, never formatted)
  local rec = {'done\31' .. rid .. sformat('\31%d\31%d', uw_start, n)}
  for i = 1, n do
    local a = assets[i]
    local x = 0
    if a.mode == 'e' or (a.kind == 'U' and a.mode == 'a') then x = a.amount end
    local bases = ''
    if #a.base_set > 0 then
      local ks = {}
      for _, k in ipairs(a.base_set) do ks[#ks + 1] = fmt(k) end
      bases = table.concat(ks, ',')
    end
    local d = a.d
    if a.kind == 'U' or a.kind == 'G' or d < 0 then d = 0 end
    rec[i + 1] = a.metric .. '\31' .. a.kind .. '\31' .. a.mode
      .. sformat('\31%d\31%d\31%d\31%d\31', a.ps, d, a.ovg_added or 0, a.charged or 0)
      .. bases .. sformat('\31%d', x)
  end
  rec[n + 2] = fmt(m)
  for j = 1, m do
    local b = bal[j]
    local charge, hold = 0, 0
    if b.exists then charge, hold = b.charge, b.hold end
    rec[n + 2 + j] = b.name .. sformat('\31%d\31%d', charge, hold)
  end
  redis.call('SET', undo_key, table.concat(rec, '\31'), 'EX', ttl)
end
return reply
