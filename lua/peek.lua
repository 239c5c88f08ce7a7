#!lua flags=no-writes
-- peek: remaining capacity and time to reset of each limit, changing nothing.
--
-- KEYS[1..]  one key per limit spec, in order
-- ARGV[1]    now in ms, or 0 to use Redis's clock
-- ARGV[2]    msgpack array of limit specs (format in lib.lua; amounts are ignored)
--
-- Returns a msgpack array {remaining_1, reset_ms_1, remaining_2, reset_ms_2, ...}:
--   window: capacity minus what counts now; reset = until all of it has slid out
--   share:  its share minus what counts in its own window (borrowing is not shown), as a window
--   lease:  free slots; reset = until the first lease expires, 0 while a slot is free
--   budget: capacity minus spent and held this period; reset = until the period ends
--   gate:   1 while open, 0 while its key exists

local now = clock(ARGV[1])
local specs = mp_unpack(ARGV[2])
local out = {}
for i, spec in ipairs(specs) do
  local key, kind, cap = KEYS[i], spec[1], spec[3]
  local used, reset = 0, 0
  if kind == 'w' or kind == 'p' then
    local w = window_view(key, now, spec[5], spec[6])
    used, reset = w.sum, window_reset(w, now)
  elseif kind == 'g' then
    used = redis.call('EXISTS', key)
  elseif kind == 'l' then
    used = lease_count(key, now, false)
    if used >= cap and used > 0 then
      reset = math.max((lease_first_expiry(key) or now) - now, 0)
    end
  else
    local start, stop = budget_period(spec, 0, now)
    used, reset = budget_read(budget_key(key, start)) or 0, stop - now
  end
  out[#out + 1] = math.max(cap - used, 0)
  out[#out + 1] = reset
end
return mp_pack(out)
