-- acquire: admit one request against every limit of one slot group, all or none.
--
-- KEYS[1]    reservation record of this request in this group
-- KEYS[2]    pending holds of this group (sorted set: request id -> hold deadline, ms)
-- KEYS[3..]  one key per limit spec, in order (a budget's key is the prefix of its periods)
-- ARGV[1]    request id
-- ARGV[2]    now in ms, or 0 to use Redis's clock
-- ARGV[3]    msgpack array of limit specs (format in lib.lua)
-- ARGV[4]    hold ttl, ms: an unsettled reservation is expired at its estimate after this
-- ARGV[5]    record ttl, ms: how long the record outlives its deadline awaiting collection
-- ARGV[6]    caller metadata, opaque bytes, returned with the hold if it expires
-- ARGV[7]    '1' to take every limit even past its capacity: usage that already happened
--            (admitted while Redis was unreachable) is recorded, not decided
-- ARGV[8]    ledger base '<prefix>{<anchor>}:' to write a ledger entry when the request is
--            finished, or '' for none (see lib.lua); ARGV[9] msgpack array of its rollup
--            dimensions
-- ARGV[10]   the slot groups of the whole request (on a Cluster a request spans several), so
--            a repeated id is matched against the request's limits in every group
-- ARGV[11]   msgpack array of the 1-based indices of shadow limits, or '' (or absent) for none.
--            A shadow limit is decided as any other but never refuses: when one would, the
--            request is admitted by the others and takes nothing in any shadow limit (as a
--            refusal would take nothing), so a shadow limit counts exactly what the same limit
--            enforced would. A refusal by an enforced limit takes nothing anywhere, as before.
-- ARGV[12]   '1' to take no shadow limit even if none of this group would refuse: one of
--            another slot group of the request would (a Cluster), so none may count it
-- ARGV[13]   the settle plan (format in lib.lua, record_each), kept in the record as 'pl' when
--            every limit takes its whole amount, or '' (or absent) for none
-- ARGV[14]   the specs of ARGV[3], flat (lib.lua), which this script decides with; ARGV[3] is
--            what the record keeps and a repeated acquire compares
--
-- Returns a msgpack map:
--   ok   1 admitted, 0 refused
--   took (admitted, when a capped limit took less than asked) per limit, the amount taken
--   st   {remaining_1, reset_ms_1, remaining_2, reset_ms_2, ...}, one pair per limit
--   i    (refused) 1-based index of the limit that frees last; why = its reason;
--        ra = retry-after ms until every refusing limit has room, -1 if it never will
--   sh   (admitted, a shadow limit would have refused) the same for the shadow limits:
--        sh = index, shwhy = reason, shra = retry-after ms or -1; every shadow limit then
--        took 0 (in took) and the record holds them as gates, which settlement leaves alone
--   sk   1 when the shadow limits were not taken (sh, or ARGV[12])
--   dup  (repeated request id) 'held' with the stored reply when the reservation is held for
--        the same keys and specs (a retry after a lost reply); 'conflict' when it is held for
--        other limits; else the finished reservation's status. Nothing is changed.
--
-- A refusal writes nothing that counts: only buckets that slid out and expired leases are purged,
-- and a share ('p') within its own part that found its total full is marked waiting (lib.lua).
-- A share is decided on the total as it stands before this call takes anything.

local rid, now = ARGV[1], clock(ARGV[2])
local S = mp_unpack(ARGV[14])  -- the specs, flat (lib.lua): limit i at S[(i - 1) * 9 + 1 ...]
local n = #S / 9
if n ~= #KEYS - 2 then
  return redis.error_reply('ERR acquire: the flat specs (ARGV[14]) do not match the keys')
end

local shadow_arg = ARGV[11] or ''
local shadow = {}
if shadow_arg ~= '' then
  for _, i in ipairs(mp_unpack(shadow_arg)) do
    shadow[i] = true
  end
end

-- A new id has no record: the rest of one is read only for a repeated id.
local status = redis.call('HGET', KEYS[1], 's')
if status == 'held' then
  local existing = redis.call('HMGET', KEYS[1], 's', 'reply', 'spec', 'keys', 'grp', 'ask', 'shw')
  if (existing[6] or existing[3]) ~= ARGV[3] or existing[4] ~= table.concat(KEYS, '\0', 3)
      or existing[5] ~= ARGV[10] or (existing[7] or '') ~= shadow_arg then
    return mp_pack({ok = 0, dup = 'conflict', st = {}})
  end
  local reply = mp_unpack(existing[2])
  reply.dup = 'held'
  return mp_pack(reply)
elseif status then
  return mp_pack({ok = 0, dup = status, st = {}})
end

local NEVER = -1
local views, states = {}, {}
local refused, reason, retry = 0, nil, 0
local sh, shwhy, shra = 0, nil, 0  -- the shadow limit that would refuse, chosen alike

-- Whether a refusal freeing after `wait` ms replaces one freeing after `than` (-1: never).
local function later(wait, than)
  return than ~= NEVER and (wait == NEVER or wait > than)
end

-- Pass 1: read every limit and decide.
for i = 1, n do
  local b = (i - 1) * 9
  local key, kind, amount, cap = KEYS[i + 2], S[b + 1], S[b + 2], S[b + 3]
  local view  -- a window's or share's is its window view; the others' made here, whole
  local why, wait
  -- a capped limit asking for nothing, or one being forced, is decided as any other
  local upto = amount > 0 and ARGV[7] ~= '1' and S[b + 9] == 1
  if kind == 'w' then
    view = window_view(key, now, S[b + 5], S[b + 6])
    view.used = view.sum
    if upto then
      view.take = math.min(amount, math.max(cap - view.used, 0))
      if cap < 1 then
        why = 'exceeds_capacity'
      elseif view.take < 1 then
        why, wait = 'window_full', window_retry(view, now, 1, cap)
      end
    elseif amount > cap then
      why = 'exceeds_capacity'
    elseif view.used + amount > cap then
      why, wait = 'window_full', window_retry(view, now, amount, cap)
    end
  elseif kind == 'p' then
    local t = S[b + 7]
    view = share_view(key, S, b, KEYS[t + 2], (t - 1) * 9, now)
    local most = math.max(cap, math.min(S[b + 8], S[(t - 1) * 9 + 3]))
    if upto then
      view.take = math.min(amount, math.max(view.room, 0))
      if most < 1 then
        why = 'exceeds_capacity'
      elseif view.take < 1 then
        why, wait = 'share_full', share_retry(view, now, 1, cap, view.level)
      end
    elseif amount > most then
      why = 'exceeds_capacity'
    elseif amount > view.room then
      why, wait = 'share_full', share_retry(view, now, amount, cap, view.level)
    end
  elseif kind == 'g' then
    view = {used = redis.call('EXISTS', key)}
    if view.used == 1 then
      why = 'closed'
    end
  elseif kind == 'l' then
    view = {used = lease_count(key, now, true)}
    if amount > cap then
      why = 'exceeds_capacity'
    elseif view.used + amount > cap then
      why, wait = 'no_free_slot', math.max((lease_first_expiry(key) or now) - now, 0)
    end
  else
    local start, stop = budget_period(S, b, now)
    local pkey = budget_key(key, start)
    local used, held = budget_read(pkey)
    view = {start = start, stop = stop, pkey = pkey, used = used or 0, held = held,
      fresh = used == nil}
    if upto then
      view.take = math.min(amount, math.max(cap - view.used, 0))
      if cap < 1 then
        why = 'exceeds_capacity'
      elseif view.take < 1 then
        why, wait = 'budget_exhausted', view.stop - now
      end
    elseif amount > cap then
      why = 'exceeds_capacity'
    elseif view.used >= cap or view.used + amount > cap then
      why, wait = 'budget_exhausted', view.stop - now
    end
  end
  if why then
    wait = wait or NEVER
    if shadow[i] then
      if sh == 0 or later(wait, shra) then
        sh, shwhy, shra = i, why, wait
      end
    elseif refused == 0 or later(wait, retry) then
      refused, reason, retry = i, why, wait
    end
  end
  views[i] = view
end

local function remaining(b, used)
  return math.max(S[b + 3] - used, 0)
end

-- Time to reset of a limit this request does not take.
local function untaken_reset(i, b, view)
  if S[b + 1] == 'w' or S[b + 1] == 'p' then
    return window_reset(view, now)
  elseif S[b + 1] == 'l' then
    if view.used >= S[b + 3] and view.used > 0 then
      return math.max((lease_first_expiry(KEYS[i + 2]) or now) - now, 0)
    end
    return 0
  elseif S[b + 1] == 'b' then
    return view.stop - now
  end
  return 0
end

-- A share not taken: marked waiting when its total was full (lib.lua), taken or not by a
-- refusal or a shadow limit's would-be refusal alike.
local function untaken_share(i, b, view)
  if S[b + 1] == 'p' then
    local need = S[b + 9] == 1 and math.min(S[b + 2], 1) or S[b + 2]
    share_mark_waiting(view, KEYS[i + 2], S, b, KEYS[S[b + 7] + 2], (S[b + 7] - 1) * 9, now, need)
  end
end

if refused > 0 and ARGV[7] ~= '1' then
  for i = 1, n do
    local b = (i - 1) * 9
    untaken_share(i, b, views[i])
    states[#states + 1] = remaining(b, views[i].used)
    states[#states + 1] = untaken_reset(i, b, views[i])
  end
  return mp_pack({ok = 0, i = refused, why = reason, ra = retry, st = states})
end

-- Pass 2: every enforced limit has room; take it and remember where, for settle and release.
-- When a shadow limit would refuse, no shadow limit is taken.
local skip = (sh > 0 or ARGV[12] == '1') and next(shadow) ~= nil and ARGV[7] ~= '1'
local at, took, short = {}, {}, false
for i = 1, n do
  local b = (i - 1) * 9
  local key, kind, amount = KEYS[i + 2], S[b + 1], S[b + 2]
  local view, reset = views[i], 0
  if skip and shadow[i] then
    view.take, kind, short = 0, 'skipped', true
    untaken_share(i, b, view)
    reset = untaken_reset(i, b, view)
  end
  if view.take then
    short = short or view.take < amount
    amount = view.take
  end
  took[i] = amount
  if kind == 'w' or kind == 'p' then
    window_add(view, now, amount)
    reset = amount > 0 and window_frees_at(view, view.cur) - now or window_reset(view, now)
    at[i] = view.cur
  elseif kind == 'g' or kind == 'skipped' then
    at[i] = 0
  elseif kind == 'l' then
    local ttl = S[b + 5]
    redis.call('ZADD', key, int(now + ttl), rid)
    redis.call('PEXPIRE', key, int(ttl))
    view.used = view.used + 1
    if view.used >= S[b + 3] then
      reset = math.max((lease_first_expiry(key) or now) - now, 0)
    end
    at[i] = 0
  else
    redis.call('HSET', view.pkey, 'u', int(view.used + amount), 'h', int(view.held + amount))
    if view.fresh then
      redis.call('PEXPIRE', view.pkey, int(view.stop + S[b + 8] - now))
    end
    reset = view.stop - now
    at[i] = view.start
  end
  if kind == 'w' or kind == 'b' or kind == 'p' then
    view.used = view.used + amount
  end
  states[#states + 1] = remaining(b, view.used)
  states[#states + 1] = reset
end

local hold_ttl, record_ttl = tonumber(ARGV[4]), tonumber(ARGV[5])
local deadline = now + hold_ttl
local reply = {ok = 1, st = states, took = short and took or nil}
if skip then
  reply.sk = 1
  if sh > 0 then
    reply.sh, reply.shwhy, reply.shra = sh, shwhy, shra
  end
end
reply = mp_pack(reply)
local stored = ARGV[3]
if short then  -- the record keeps the amounts taken, where every version reads them
  local specs = mp_unpack(ARGV[3])
  for i, spec in ipairs(specs) do
    spec[2] = took[i]
    if skip and shadow[i] then  -- held as a gate: nothing to settle, renew or refund
      specs[i] = {'g', 0, 1, ''}
    end
  end
  stored = mp_pack(specs)
  redis.call('HSET', KEYS[1], 'ask', ARGV[3])
end
local keys = table.concat(KEYS, '\0', 3)
local dl, life = int(deadline), int(hold_ttl + record_ttl)
-- the settle plan only while every limit took its amount as asked (lib.lua, record_each)
local plan = not short and ARGV[13] or ''
if ARGV[8] ~= '' then
  redis.call('HSET', KEYS[1], 's', 'held', 't0', int(now), 'dl', dl, 'spec', stored,
    'keys', keys, 'at', mp_pack(at), 'meta', ARGV[6], 'reply', reply, 'grp', ARGV[10],
    'pl', plan, 'lg', ARGV[8], 'dims', ARGV[9])
else
  redis.call('HSET', KEYS[1], 's', 'held', 't0', int(now), 'dl', dl, 'spec', stored,
    'keys', keys, 'at', mp_pack(at), 'meta', ARGV[6], 'reply', reply, 'grp', ARGV[10],
    'pl', plan)
end
if shadow_arg ~= '' then  -- a repeated acquire must name the same shadow limits
  redis.call('HSET', KEYS[1], 'shw', shadow_arg)
end
redis.call('PEXPIRE', KEYS[1], life)
redis.call('ZADD', KEYS[2], dl, rid)
redis.call('PEXPIRE', KEYS[2], life)
return reply
