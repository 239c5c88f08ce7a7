-- Shared helpers. The engine prepends this file to every script before loading it,
-- so each script stays one atomic EVALSHA while the arithmetic lives in one place.
--
-- Limit specs arrive as msgpack arrays, one per limit, in KEYS order:
--   {kind, amount, capacity, measure, p1, p2, p3, p4}
--   kind 'w' sliding window:  p1 = window ms, p2 = bucket ms
--   kind 'l' lease semaphore: p1 = lease ttl ms
--   kind 'b' spend budget:    p1, p2, p3 = period boundaries b0 < b1 < b2 (ms), p4 = retention ms
-- All amounts are integers (requests, tokens, nano-dollars); all times are milliseconds
-- on Redis's clock unless the caller passes an explicit "now" (tests, simulations).

local floor = math.floor
local mp_pack, mp_unpack = cmsgpack.pack, cmsgpack.unpack

-- Lua numbers are doubles; redis.call would render large ones as 1e+15, which INCRBY refuses.
local function int(n)
  return string.format('%d', n)
end

local function clock(override)
  local now = tonumber(override)
  if now and now > 0 then
    return now
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + floor(tonumber(t[2]) / 1000)
end

-- Sliding window -------------------------------------------------------------------
-- A hash of buckets of g ms: field 's' = sum of live buckets, field 'o' = oldest bucket
-- id still stored, and one field per bucket named (id mod M). A request at time t counts
-- while its bucket id >= floor((now - W) / g): the oldest bucket is counted whole, so the
-- window can only under-admit, by at most that bucket's share, and never over-admit.

local function window_view(key, now, W, g)
  local w = {key = key, W = W, g = g, M = math.ceil(W / g) + 1}
  w.lo = floor((now - W) / g)
  w.cur = floor(now / g)
  local v = redis.call('HMGET', key, 's', 'o')
  w.sum = tonumber(v[1]) or 0
  w.o = tonumber(v[2])
  w.expired = {}
  if w.o and w.o < w.lo then
    if w.lo - w.o >= w.M then
      w.sum = 0
      w.gone = true
    else
      for id = w.o, w.lo - 1 do
        w.expired[#w.expired + 1] = tostring(id % w.M)
      end
      local old = redis.call('HMGET', key, unpack(w.expired))
      for i = 1, #old do
        w.sum = w.sum - (tonumber(old[i]) or 0)
      end
    end
  end
  return w
end

-- Makes the stored hash match the view: drops the buckets that slid out.
local function window_purge(w)
  if w.gone then
    redis.call('DEL', w.key)
  elseif #w.expired > 0 then
    redis.call('HDEL', w.key, unpack(w.expired))
    redis.call('HSET', w.key, 's', int(w.sum))
  end
  -- 'o' only moves forward, so a clock stepping back cannot resurrect purged buckets.
  if w.o == nil or w.o < w.lo then
    redis.call('HSET', w.key, 'o', int(w.lo))
    w.o = w.lo
  end
end

-- Amount in each live bucket, oldest first. Before a purge, a live bucket whose field
-- name is shared with a stored expired bucket (id - M >= o) has not been written yet.
local function window_buckets(w)
  local fields = {}
  for id = w.lo, w.cur do
    fields[#fields + 1] = tostring(id % w.M)
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

local function window_add(w, now, amount)
  redis.call('HINCRBY', w.key, tostring(w.cur % w.M), int(amount))
  redis.call('HINCRBY', w.key, 's', int(amount))
  w.sum = w.sum + amount
  redis.call('PEXPIRE', w.key, int(window_frees_at(w, w.cur) - now))
end

-- Changes a reserved bucket by delta if it still counts; never below zero.
local function window_adjust(key, now, W, g, id, delta)
  local w = window_view(key, now, W, g)
  if w.o == nil or id < w.lo then
    return
  end
  window_purge(w)
  local field = tostring(id % w.M)
  local held = tonumber(redis.call('HGET', key, field)) or 0
  if held + delta < 0 then
    delta = -held
  end
  if delta ~= 0 then
    redis.call('HINCRBY', key, field, int(delta))
    redis.call('HINCRBY', key, 's', int(delta))
  end
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

-- Spend budget ----------------------------------------------------------------------
-- One hash per period, named <key>:<period start ms>: 'u' = spent plus held, 'h' = held.
-- The caller sends the current period and the next one, so a request that crosses the
-- boundary on Redis's clock lands in the right period with no reset job.

local function budget_period(spec, now)
  local b0, b1, b2 = spec[5], spec[6], spec[7]
  if now >= b1 then
    return b1, b2
  end
  return b0, b1
end

local function budget_key(key, start)
  return key .. ':' .. int(start)
end

local function budget_used(pkey)
  return tonumber(redis.call('HGET', pkey, 'u')) or 0
end

-- Adds to spend and holds of one period; the key lives until the period ends plus retention.
local function budget_add(pkey, used, held, period_end, retention, now)
  if used ~= 0 then
    redis.call('HINCRBY', pkey, 'u', int(used))
  end
  if held ~= 0 then
    redis.call('HINCRBY', pkey, 'h', int(held))
  end
  redis.call('PEXPIRE', pkey, int(math.max(period_end + retention - now, 1000)))
end

-- Reservation records ---------------------------------------------------------------
-- One msgpack string per request and slot group; status 'held' until it is settled,
-- released or expired, then kept for the result ttl so a repeated call can be answered.

local function record_load(key)
  local raw = redis.call('GET', key)
  if not raw then
    return nil
  end
  return mp_unpack(raw)
end

local function record_store(key, rec, ttl)
  redis.call('SET', key, mp_pack(rec), 'PX', int(ttl))
end

-- Applies the final amounts of a held reservation to every limit it touched.
-- mode 'settle': measured limits take `actuals[measure]`, others keep their reservation;
-- mode 'release': everything is refunded; mode 'expire': charged at the estimate.
-- Returns two maps measure -> amount: what was reserved and what is charged.
local function record_finish(rec, rid, now, mode, actuals)
  local reserved, charged = {}, {}
  for _, lim in ipairs(rec.L) do
    local final = lim.a
    if mode == 'release' then
      final = 0
    elseif mode == 'settle' and lim.m ~= '' and actuals[lim.m] ~= nil then
      final = actuals[lim.m]
    end
    if lim.m ~= '' and charged[lim.m] == nil then
      reserved[lim.m], charged[lim.m] = lim.a, final
    end
    if lim.k == 'w' then
      if final ~= lim.a then
        window_adjust(lim.key, now, lim.W, lim.g, lim.id, final - lim.a)
      end
    elseif lim.k == 'b' then
      budget_add(lim.key, final - lim.a, -lim.a, lim.pe, lim.r, now)
    else
      redis.call('ZREM', lim.key, rid)
    end
  end
  return reserved, charged
end
