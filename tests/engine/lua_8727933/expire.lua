-- expire: finalise reservations of one slot group whose hold deadline has passed (their
-- sidecar died or hung). Each is charged at its estimate: windows and budgets keep what was
-- reserved, budget holds become spend, leases are freed.
--
-- KEYS[1]  pending holds of this group
-- ARGV[1]  now in ms, or 0 to use Redis's clock
-- ARGV[2]  at most this many reservations per call
-- ARGV[3]  prefix of this group's record keys (the record of request r is prefix .. r; it
--          shares KEYS[1]'s hash tag, so it lives in the same slot)
-- ARGV[4]  result ttl, ms
--
-- Returns a msgpack array of maps {rid, t0, t1, dl, est, meta}, one per expired hold,
-- each returned by exactly one call; a pending entry whose record is gone (its record ttl
-- passed first) comes back with lost = 1 and no amounts.

local now, batch, prefix = clock(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', int(now), 'LIMIT', 0, batch)
local out = {}
for _, rid in ipairs(due) do
  local key = prefix .. rid
  local rec = record_load(key)
  redis.call('ZREM', KEYS[1], rid)
  if not rec then
    out[#out + 1] = {rid = rid, lost = 1}
  elseif rec.s == 'held' then
    local reserved = record_finish(rec, key, rid, now, 'expire', {}, tonumber(ARGV[4]))
    out[#out + 1] = {rid = rid, t0 = tonumber(rec.t0), t1 = now, dl = tonumber(rec.dl),
      est = reserved, meta = rec.meta}
  end
end
return mp_pack(out)
