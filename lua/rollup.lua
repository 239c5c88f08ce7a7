-- rollup: fold one slot group's new ledger entries into its daily rollups, its lifetime spend
-- and its index of days, exactly once; then, with nothing left to fold, run one action in the
-- same atomic step. Runs on its own (lib.lua is not prepended).
--
-- Settlement (lib.lua, ledger_write) appends each finished request to the stream
-- <lg>ledger:<day> with its rollup dimensions (field d, a msgpack array) and adds the day to
-- KEYS[1]. For each such day this script reads the stream past the day's checkpoint and, for
-- every entry and dimension d, adds to <lg>rollup:<day> d|<status> 1 and d|<measure> the amount
-- charged, to KEYS[4] d the spend; it adds the day to KEYS[3] and moves the checkpoint to the
-- last entry read. All of it is one script: a crash leaves all of it or none, so no entry is
-- counted twice or lost. Entries without d were written by an older version, which counted
-- them in the rollups as it wrote them: they are passed over.
--
-- KEYS[1]  <lg>rollup-due    set of day numbers whose streams may hold entries not folded yet
-- KEYS[2]  <lg>rollup-at     hash: day number -> stream id of the last entry folded
-- KEYS[3]  <lg>ledger-days   sorted set of the days that hold a stream (member = score = day)
-- KEYS[4]  <lg>lifetime      hash: dimension -> lifetime spend, nano-dollars (no TTL)
-- ARGV[1]  <lg>, the prefix of the streams and rollup hashes (all share the keys' hash tag)
-- ARGV[2]  fold at most this many entries in this call
-- ARGV[3]  the action, run only once every entry is folded:
--            ''                       none
--            'days', first, last      the day numbers in [first, last] that hold a stream
--            'spend', d1, d2, ...     the lifetime spend of these dimensions (nil: none)
--            'set', d, amount         make d's lifetime spend amount (0 removes the field)
--            'trim', day, minid       remove the entries of day's stream below minid (exact)
-- Returns {more, folded, result}: more = 1 when entries are left to fold (the action was not
-- run: call again), folded = how many entries this call read, result = the action's answer.

local due, at, days, lifetime = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local lg, budget, action = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local ROLLUP_TTL_MS = 400 * 86400000 -- as long as the rollups written inline used to live
local EXACT = 2 ^ 53 -- Lua numbers are doubles: sums stay below this, whole and exact

local function int(n)
  return string.format('%d', n)
end

-- Increments gathered per hash and field, so a batch writes each field once (see write).
local sums = {}
local function add(key, field, n)
  local fields = sums[key]
  if not fields then
    fields = {}
    sums[key] = fields
  end
  local v = (fields[field] or 0) + n
  if v >= EXACT then
    redis.call('HINCRBY', key, field, int(fields[field]))
    v = n
  end
  fields[field] = v
end

local function fold(rollup, status, out, dims)
  dims, out = cmsgpack.unpack(dims), cmsgpack.unpack(out)
  local spend = out.spend or 0
  for _, d in ipairs(dims) do
    add(rollup, d .. '|' .. status, 1)
    for measure, amount in pairs(out) do
      if amount ~= 0 then
        add(rollup, d .. '|' .. measure, amount)
      end
    end
    if spend ~= 0 then
      add(lifetime, d, spend)
    end
  end
end

local folded, more = 0, 0
for _, day in ipairs(redis.call('SMEMBERS', due)) do
  local room = budget - folded
  if room <= 0 then
    more = 1
    break
  end
  local rollup = lg .. 'rollup:' .. day
  local rows = redis.call('XRANGE', lg .. 'ledger:' .. day,
    '(' .. (redis.call('HGET', at, day) or '0-0'), '+', 'COUNT', room)
  for _, row in ipairs(rows) do
    local flat, status, out, dims = row[2], nil, nil, nil
    for i = 1, #flat, 2 do  -- found in place: a table of the fields per entry costs more
      local field = flat[i]
      if field == 's' then
        status = flat[i + 1]
      elseif field == 'out' then
        out = flat[i + 1]
      elseif field == 'd' then
        dims = flat[i + 1]
      end
    end
    if dims then
      fold(rollup, status, out, dims)
    end
  end
  folded = folded + #rows
  if #rows > 0 then
    redis.call('HSET', at, day, rows[#rows][1])
  end
  if #rows < room then
    redis.call('SREM', due, day) -- read to the end; the next entry adds the day again
  else
    more = 1
  end
  redis.call('ZADD', days, day, day)
end

-- One HMGET and one HSET per hash rather than an HINCRBY per field: a batch then reaches
-- the AOF and the replicas as a few commands. A field whose sum would reach 2^53 (no longer
-- exact as a Lua number) takes its own HINCRBY.
local function write(key, fields)
  local names, args = {}, {}
  for field in pairs(fields) do
    names[#names + 1] = field
  end
  for first = 1, #names, 1000 do  -- unpack takes a bounded number of values
    local page = {unpack(names, first, math.min(first + 999, #names))}
    local stored = redis.call('HMGET', key, unpack(page))
    for i, field in ipairs(page) do
      local v = (tonumber(stored[i]) or 0) + fields[field]
      if v < EXACT then
        args[#args + 1] = field
        args[#args + 1] = int(v)
      else
        redis.call('HINCRBY', key, field, int(fields[field]))
      end
    end
    if #args > 0 then
      redis.call('HSET', key, unpack(args))
      args = {}
    end
  end
end

for key, fields in pairs(sums) do
  write(key, fields)
  if key ~= lifetime then
    redis.call('PEXPIRE', key, ROLLUP_TTL_MS)
  end
end

local result = false
if more == 1 then
  return {more, folded, result}
elseif action == 'days' then
  result = redis.call('ZRANGEBYSCORE', days, ARGV[4], ARGV[5])
elseif action == 'spend' then
  result = redis.call('HMGET', lifetime, unpack(ARGV, 4))
elseif action == 'set' then
  if tonumber(ARGV[5]) == 0 then
    redis.call('HDEL', lifetime, ARGV[4])
  else
    redis.call('HSET', lifetime, ARGV[4], ARGV[5])
  end
elseif action == 'trim' then
  result = redis.call('XTRIM', lg .. 'ledger:' .. ARGV[4], 'MINID', ARGV[5])
end
return {more, folded, result}
