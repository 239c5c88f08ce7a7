-- Shared helpers. The engine prepends this file to every script before loading it,
-- so each script stays one atomic EVALSHA while the arithmetic lives in one place.
-- Only the parts a script uses are prepended (ratelimiter/engine/scripts.py, PARTS): every local
-- function is a closure made anew on every call, so each one a script never calls costs it for
-- nothing. A part runs from a line '-- [part: name]' to the next; what comes before the first
-- goes to every script.
--
-- Limit specs arrive as msgpack arrays, one per limit, in KEYS order:
--   {kind, amount, capacity, measure, p1, p2, p3, p4}
--   kind 'w' sliding window:  p1 = window ms, p2 = bucket ms
--   kind 'l' lease semaphore: p1 = lease ttl ms
--   kind 'b' spend budget:    p1, p2, p3 = period boundaries b0 < b1 < b2 (ms), p4 = retention ms
--   kind 'g' gate:            refuses while its key exists (a block); capacity 1, amount 0
--   kind 'p' share of a total: p1 = window ms, p2 = bucket ms, p3 = 1-based index of the total
--                              window (a 'w' spec of the same call), p4 = saturation level;
--                              capacity = the share (see "Share of a total window" below)
-- A window or budget may be capped: its spec then ends with a 1 after its parameters
-- (spec[7] for a window, spec[9] for a budget or a share). A capped limit takes "up to amount": it
-- admits while at least one unit is left and takes min(amount, what is left), so a request
-- that does not bound itself can pass it only alone, by its own excess.
-- acquire gets the same specs flat as well, to decide with: one msgpack array of 9 values per
-- limit, the spec's first 8 (0 where it has fewer) and 1 if it is capped, else 0. Unpacking it
-- costs half what the nested arrays cost (a Lua table each, grown element by element).
-- All amounts are integers (requests, tokens, nano-dollars); all times are milliseconds
-- on Redis's clock unless the caller passes an explicit "now" (tests, simulations).

local floor = math.floor
local mp_pack, mp_unpack = cmsgpack.pack, cmsgpack.unpack

-- Lua numbers are doubles; redis.call would render large ones as 1e+15, which INCRBY refuses.
-- Also the cheapest way to a string for any whole number: tostring formats with %.14g, which
-- costs twice as much.
local format = string.format
local function int(n)
  return format('%d', n)
end

local function clock(override)
  local now = tonumber(override)
  if now and now > 0 then
    return now
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + floor(tonumber(t[2]) / 1000)
end

-- [part: decide]
-- Sliding window -------------------------------------------------------------------
-- A hash of buckets of g ms: field 's' = sum of live buckets, field 'o' = oldest bucket
-- id still stored, and one field per bucket named (id mod M). A request at time t counts
-- while its bucket id >= floor((now - W) / g): the oldest bucket is counted whole, so the
-- window can only under-admit, by at most that bucket's share, and never over-admit.

local function window_view(key, now, W, g)
  local M, cur = math.ceil(W / g) + 1, floor(now / g)
  local lo, field = floor((now - W) / g), int(cur % M)
  local v = redis.call('HMGET', key, 's', 'o', field)
  -- one constructor: a table grown field by field is rehashed several times, per limit
  local w = {key = key, W = W, g = g, M = M, lo = lo, cur = cur, field = field,
    sum = tonumber(v[1]) or 0, o = tonumber(v[2]), in_cur = tonumber(v[3]) or 0, gone = false,
    expired = false}
  if w.o and w.o < lo then
    if lo - w.o >= M then
      w.sum, w.in_cur, w.gone = 0, 0, true
    else
      local expired = {}
      for id = w.o, lo - 1 do
        expired[#expired + 1] = int(id % M)
      end
      local old = redis.call('HMGET', key, unpack(expired))
      for i = 1, #old do
        w.sum = w.sum - (tonumber(old[i]) or 0)
      end
      if cur - M >= w.o then
        w.in_cur = 0 -- its field still holds an expired bucket, dropped on write
      end
      w.expired = expired
    end
  end
  return w
end

-- Writes the view back with the current bucket's new amount (nil: unchanged): first drops the
-- buckets that slid out, then one HSET for it, the sum and the oldest id.
local function window_write(w, in_cur)
  local key = w.key
  if w.gone then
    redis.call('DEL', key)
  elseif w.expired then
    redis.call('HDEL', key, unpack(w.expired))
  end
  -- 'o' only moves forward, so a clock stepping back cannot resurrect purged buckets.
  if w.o == nil or w.o < w.lo then
    w.o = w.lo
    if in_cur then
      redis.call('HSET', key, 's', int(w.sum), w.field, int(in_cur), 'o', int(w.lo))
    else
      redis.call('HSET', key, 's', int(w.sum), 'o', int(w.lo))
    end
  elseif in_cur then
    redis.call('HSET', key, 's', int(w.sum), w.field, int(in_cur))
  else
    redis.call('HSET', key, 's', int(w.sum))
  end
end

-- Amount in each live bucket, oldest first. Before a purge, a live bucket whose field
-- name is shared with a stored expired bucket (id - M >= o) has not been written yet.
local function window_buckets(w)
  local fields = {}
  for id = w.lo, w.cur do
    fields[#fields + 1] = int(id % w.M)
  end
  local vals = redis.call('HMGET', w.key, unpack(fields))
  local out = {}
  for i = 1, #vals do
    local id = w.lo + i - 1
    if w.gone or (w.o and id - w.M >= w.o) then
      out[i] = 0
    else
      out[i] = tonumber(vals[i]) or 0
    end
  end
  return out
end

-- The bucket with id b stops counting at (b + 1) * g + W.
local function window_frees_at(w, id)
  return (id + 1) * w.g + w.W
end

-- Time until everything now counted has slid out.
local function window_reset(w, now)
  if w.sum <= 0 then
    return 0
  end
  local vals = window_buckets(w)
  for i = #vals, 1, -1 do
    if vals[i] > 0 then
      return window_frees_at(w, w.lo + i - 1) - now
    end
  end
  return 0
end

-- Exact time until `amount` more fits under `capacity`, given the stored buckets.
local function window_retry(w, now, amount, capacity)
  local vals = window_buckets(w)
  local need = w.sum + amount - capacity
  for i = 1, #vals do
    need = need - vals[i]
    if need <= 0 then
      return window_frees_at(w, w.lo + i - 1) - now
    end
  end
  return window_frees_at(w, w.cur) - now
end

-- Takes `amount` in the current bucket. The first write to a bucket sets the key to
-- expire when that bucket slides out; later writes to it need not repeat that.
local function window_add(w, now, amount)
  local fresh = w.in_cur == 0
  w.sum = w.sum + amount
  w.in_cur = w.in_cur + amount
  window_write(w, amount > 0 and w.in_cur or nil)
  if fresh then
    redis.call('PEXPIRE', w.key, int(window_frees_at(w, w.cur) - now))
  end
end

-- [part: finish]
-- Changes a reserved bucket by delta if it still counts; never below zero. Reads and writes
-- only the sum and that bucket (two calls): buckets that slid out stay counted in 's' until the
-- next acquire purges them, as every reader subtracts them, and 'o' stays where it is.
local function window_adjust(key, now, W, g, id, delta)
  local M = math.ceil(W / g) + 1
  local field = int(id % M)
  local v = redis.call('HMGET', key, 's', 'o', field)
  local o = tonumber(v[2])
  -- the bucket is gone once it slid out; a field below 'o' was purged (clock stepped back)
  if o == nil or id < floor((now - W) / g) or id < o then
    return
  end
  local held = tonumber(v[3]) or 0
  delta = math.max(delta, -held)
  redis.call('HSET', key, 's', int((tonumber(v[1]) or 0) + delta), field, int(held + delta))
end

-- [part: decide]
-- Share of a total window ('p') ----------------------------------------------------------
-- A sliding window of its own (as 'w'; its capacity is the share) over a total window that
-- another spec of the same call counts. It admits while its own window stays within the share,
-- or, borrowing, while the total after the request stays at or below the saturation level and
-- leaves room in the total for the unused shares of the other shares that are waiting. A share
-- is waiting for one total window after a request within it was refused because the total was
-- full: the hash <total key>:waiting keeps, per share key, 'until share window-ms bucket-ms'.
-- Every share of one total lives in the total's slot (the same hash tag).

-- The unused part of every waiting share of `total_key` but `own`.
local function share_protected(total_key, own, now)
  local flat = redis.call('HGETALL', total_key .. ':waiting')
  local sum = 0
  for i = 1, #flat, 2 do
    local till, share, W, g = string.match(flat[i + 1], '^(%d+) (%d+) (%d+) (%d+)$')
    if flat[i] ~= own and till and tonumber(till) > now then
      local used = window_view(flat[i], now, tonumber(W), tonumber(g)).sum
      sum = sum + math.max(tonumber(share) - used, 0)
    end
  end
  return sum
end

-- Reads a share and its total (read-only views); room = the most the request may take now.
-- The share's spec is S[b + 1 ..], its total's S[tb + 1 ..] (flat specs, as acquire gets them).
local function share_view(key, S, b, total_key, tb, now)
  local view = window_view(key, now, S[b + 5], S[b + 6])
  view.used = view.sum
  view.total = window_view(total_key, now, S[tb + 5], S[tb + 6])
  view.total_cap = S[tb + 3]
  view.level = math.min(S[b + 8], S[tb + 3] - share_protected(total_key, key, now))
  view.room = math.max(S[b + 3] - view.used, view.level - view.total.sum)
  return view
end

-- Time until `amount` fits: in the share when it can, else under the saturation level.
local function share_retry(view, now, amount, share, level)
  if amount <= share then
    return window_retry(view, now, amount, share)
  end
  return window_retry(view.total, now, amount, level)
end

-- After a refusal: a request within its share that found the total full marks the share as
-- waiting, so that nobody borrows its unused part for one total window.
local function share_mark_waiting(view, key, S, b, total_key, tb, now, need)
  if view.used + need > S[b + 3] or view.total.sum + need <= view.total_cap then
    return
  end
  local W = S[tb + 5]
  redis.call('HSET', total_key .. ':waiting', key,
    int(now + W) .. ' ' .. int(S[b + 3]) .. ' ' .. int(S[b + 5]) .. ' ' .. int(S[b + 6]))
  redis.call('PEXPIRE', total_key .. ':waiting', int(W))
end

-- Lease semaphore -------------------------------------------------------------------
-- A sorted set: member = request id, score = lease expiry. Expired leases are free.

-- Leases in force. With purge, expired members are removed first (acquire does this, so a
-- member still present past its expiry means nobody has been given its slot since).
local function lease_count(key, now, purge)
  if purge then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', int(now))
    return redis.call('ZCARD', key)
  end
  return redis.call('ZCOUNT', key, '(' .. int(now), '+inf')
end

local function lease_first_expiry(key)
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  return tonumber(first[2])
end

-- [part: budget]
-- Spend budget ----------------------------------------------------------------------
-- One hash per period, named <key>:<period start ms>: 'u' = spent plus held, 'h' = held.
-- The caller sends the current period and the next one, so a request that crosses the
-- boundary on Redis's clock lands in the right period with no reset job.

-- The spec is S[b + 1 ..]: a spec of its own (b = 0) or one of flat specs.
local function budget_period(S, b, now)
  local b0, b1, b2 = S[b + 5], S[b + 6], S[b + 7]
  if now >= b1 then
    return b1, b2
  end
  return b0, b1
end

local function budget_key(key, start)
  return key .. ':' .. int(start)
end

-- Spent-plus-held and held of one period; nil when the period has no key yet.
local function budget_read(pkey)
  local v = redis.call('HMGET', pkey, 'u', 'h')
  return tonumber(v[1]), tonumber(v[2]) or 0
end

-- [part: finish]
-- Adds to spend and holds of one period; a new key lives until the period ends plus retention.
local function budget_add(pkey, used, held, period_end, retention, now)
  local u, h = budget_read(pkey)
  redis.call('HSET', pkey, 'u', int((u or 0) + used), 'h', int(h + held))
  if u == nil then
    redis.call('PEXPIRE', pkey, int(math.max(period_end + retention - now, 1000)))
  end
end

-- Reservation records ---------------------------------------------------------------
-- One hash per request and slot group. While held it keeps what acquire was given, as
-- given (packing it anew would cost more than the whole admission's bookkeeping):
--   s = 'held' | 'settled' | 'released' | 'expired'    t0, dl = acquired at, hold deadline
--   spec = the msgpack specs    keys = the limit keys joined by NUL
--   at = msgpack array, per limit: the bucket id (window), period start (budget), 0 (lease)
--   meta = caller metadata      reply = acquire's packed answer, for a repeated acquire
--   pl = the settle plan (record_each), from the caller; absent in records of older versions,
--        which is why every other field stays: each version finishes the other's records
-- When a capped limit took less than asked, spec holds the specs with the amounts taken (so
-- every version of these scripts settles what was taken) and ask = the specs as given, which a
-- repeated acquire compares with.
-- Once finished, spec/keys/at/pl give way to t1, est and out (msgpack maps measure -> amount)
-- and the hash lives for the result ttl so repeated calls get the first outcome.

-- The fields of a record that settle, renew and expire read (not the whole hash: its repeated
-- acquire's reply and group list are never needed here); nil when there is no record.
local function record_load(key)
  local v = redis.call('HMGET', key, 's', 't0', 't1', 'dl', 'est', 'out', 'meta', 'spec', 'keys',
    'at', 'pl', 'lg', 'dims')
  if not v[1] then
    return nil
  end
  -- HMGET gives false for a missing field; the record leaves it out (nil), as HGETALL did
  return {s = v[1], t0 = v[2] or nil, t1 = v[3] or nil, dl = v[4] or nil, est = v[5] or nil,
    out = v[6] or nil, meta = v[7] or nil, spec = v[8] or nil, keys = v[9] or nil,
    at = v[10] or nil, pl = v[11] or nil, lg = v[12] or nil, dims = v[13] or nil}
end

-- Where each amount of a held record went: {kind, key, amount, measure, ...} per limit,
-- windows adding window ms, bucket ms, bucket id; leases the ttl; budgets the period key's
-- end and retention (the key itself is the period's).
local function record_limits(rec)
  local specs, at, keys = mp_unpack(rec.spec), mp_unpack(rec.at), {}
  for key in string.gmatch(rec.keys, '([^%z]+)') do
    keys[#keys + 1] = key
  end
  local out = {}
  for i, spec in ipairs(specs) do
    local kind, amount, measure = spec[1], spec[2], spec[4]
    if kind == 'w' or kind == 'p' then
      out[i] = {kind, keys[i], amount, measure, spec[5], spec[6], at[i]}
    elseif kind == 'l' or kind == 'g' then
      out[i] = {kind, keys[i], amount, '', spec[5]}
    else
      local stop = at[i] == spec[5] and spec[6] or spec[7]
      out[i] = {kind, budget_key(keys[i], at[i]), amount, measure, stop, spec[8]}
    end
  end
  return out
end

local function record_fields(rec)
  return {s = rec.s, first = 0, t0 = tonumber(rec.t0), t1 = tonumber(rec.t1),
    est = rec.est and mp_unpack(rec.est), out = rec.out and mp_unpack(rec.out), meta = rec.meta}
end

-- Applies the final amounts of a held reservation to every limit it touched and marks the
-- record finished. mode 'settle': measured limits take `actuals[measure]`, others keep
-- their reservation; 'release': everything is refunded; 'expire': charged at the estimate.
-- Returns two maps measure -> amount: what was reserved and what is charged.
-- The spend ledger -------------------------------------------------------------------
-- A record acquired with a ledger base (rec.lg, '<prefix>{<anchor>}:') writes one stream
-- entry when it is finished, in the same script, so counters and ledger never disagree:
-- stream <lg>ledger:<UTC day number>, fields rid, t0, t1, s (status), est, out (msgpack
-- measure -> amount), meta (from acquire), info (from settle) and d (the rollup dimensions
-- given at acquire, msgpack). The day joins the set <lg>rollup-due, and rollup.lua folds the
-- entry into the day's rollup hash, the lifetime spend and the index of days, exactly once and
-- seconds later (readers fold first, so they never see the lag); older versions added to those
-- here, on every settlement: an eighth of a request's Redis instructions (benchmarks.settle_cost).
local DAY_MS = 86400000

local function ledger_write(rec, rid, now, t1, status, est, out, info)
  local day = int(floor(now / DAY_MS))
  redis.call('XADD', rec.lg .. 'ledger:' .. day, '*', 'rid', rid, 't0', rec.t0, 't1', t1,
    's', status, 'est', est, 'out', out, 'meta', rec.meta or '', 'info', info or '',
    'd', rec.dims)
  redis.call('SADD', rec.lg .. 'rollup-due', day)
end

-- Calls limit(kind, key, amount, measure, ...) for each limit of a held record, with the
-- arguments of record_limits. A record with a settle plan (rec.pl, written by acquire when every
-- limit took its amount) gives only what settlement at the estimate or at the actuals changes:
-- measured windows and shares, budgets, leases. Unpacking it and 'at' costs less than the specs
-- and keys, and the limits it leaves out (unmeasured windows, gates) are not even read. A refund
-- changes every window, so it reads the specs. The plan is a flat msgpack array, one entry per
-- limit in KEYS order: 'w', index, key, amount, measure, window ms, bucket ms (a window or a
-- share with a measure); 'b', index, key, amount, measure, b1, b2, retention ms (a budget; its
-- period is b0..b1 or b1..b2, by the start in 'at'); 'l', key (a lease). index = the limit's
-- place in 'at'.
local function record_each(rec, refund, limit)
  if rec.pl == nil or rec.pl == '' or refund then
    for _, lim in ipairs(record_limits(rec)) do
      limit(unpack(lim))
    end
    return
  end
  local at, pl, n = mp_unpack(rec.at), mp_unpack(rec.pl), 1
  while pl[n] do
    local kind = pl[n]
    if kind == 'w' then
      limit('w', pl[n + 2], pl[n + 3], pl[n + 4], pl[n + 5], pl[n + 6], at[pl[n + 1]])
      n = n + 7
    elseif kind == 'b' then
      local start = at[pl[n + 1]]
      local stop = start < pl[n + 5] and pl[n + 5] or pl[n + 6]
      limit('b', budget_key(pl[n + 2], start), pl[n + 3], pl[n + 4], stop, pl[n + 7])
      n = n + 8
    else
      limit('l', pl[n + 1], 1, '')
      n = n + 2
    end
  end
end

local function record_finish(rec, key, rid, now, mode, actuals, ttl, info)
  local reserved, charged = {}, {}
  local refund = mode == 'release' or mode == 'cancel'
  record_each(rec, refund, function(kind, lkey, amount, measure, p5, p6, p7)
    local final = amount
    if refund then
      final = 0
    elseif mode == 'settle' and measure ~= '' and actuals[measure] ~= nil then
      final = actuals[measure]
    end
    if measure ~= '' and charged[measure] == nil then
      reserved[measure], charged[measure] = amount, final
    end
    if kind == 'w' or kind == 'p' then
      if final ~= amount then
        window_adjust(lkey, now, p5, p6, p7, final - amount)
      end
    elseif kind == 'b' then
      budget_add(lkey, final - amount, -amount, p5, p6, now)
    elseif kind == 'l' then
      redis.call('ZREM', lkey, rid)
    end
  end)
  if mode == 'settle' then  -- measured but limited nowhere (tokens with no tpm): still recorded
    for measure, amount in pairs(actuals) do
      if charged[measure] == nil then
        charged[measure] = amount
      end
    end
  end
  if mode == 'cancel' then  -- undone as if never acquired: no ledger entry, no record
    redis.call('DEL', key)
    return reserved, charged
  end
  local status = mode == 'release' and 'released' or (mode == 'settle' and 'settled' or 'expired')
  rec.s, rec.t1, rec.est, rec.out = status, now, mp_pack(reserved), mp_pack(charged)
  local t1 = int(now)
  if rec.lg then
    ledger_write(rec, rid, now, t1, status, rec.est, rec.out, info)
  end
  redis.call('HDEL', key, 'spec', 'keys', 'at', 'reply', 'dims', 'ask', 'grp', 'pl')
  redis.call('HSET', key, 's', status, 't1', t1, 'est', rec.est, 'out', rec.out)
  redis.call('PEXPIRE', key, int(ttl))
  return reserved, charged
end
