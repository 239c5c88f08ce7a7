-- renew: extend the leases and the hold of a reservation that is still running (a stream).
--
-- KEYS[1]  reservation record of this request in this group
-- KEYS[2]  pending holds of this group
-- ARGV[1]  request id
-- ARGV[2]  now in ms, or 0 to use Redis's clock
-- ARGV[3]  hold ttl, ms: the new deadline is now + this
-- ARGV[4]  record ttl, ms, as given to acquire
--
-- Each lease gets now + its own ttl. A lease that is no longer in its set (it expired and
-- another request may hold the slot) is not recreated: that would over-admit.
-- Returns a msgpack map: s = status ('held', 'settled', ..., 'unknown'),
-- lost = number of leases that could not be renewed, dl = the new hold deadline.

local rid, now = ARGV[1], clock(ARGV[2])
local rec = record_load(KEYS[1])
if not rec then
  return mp_pack({s = 'unknown', lost = 0})
end
if rec.s ~= 'held' then
  return mp_pack({s = rec.s, lost = 0})
end

local lost = 0
for _, lim in ipairs(record_limits(rec)) do
  local kind, key, ttl = lim[1], lim[2], lim[5]
  if kind == 'l' then
    -- a lease past its expiry is still counted until an acquire purges it, so updating it
    -- in place (XX) never takes a slot someone else was given
    if redis.call('ZADD', key, 'XX', 'CH', int(now + ttl), rid) == 0
        and not redis.call('ZSCORE', key, rid) then
      lost = lost + 1
    end
    if redis.call('PTTL', key) < ttl then
      redis.call('PEXPIRE', key, int(ttl))
    end
  end
end

local hold_ttl, record_ttl = tonumber(ARGV[3]), tonumber(ARGV[4])
local deadline = now + hold_ttl
redis.call('HSET', KEYS[1], 'dl', int(deadline))
redis.call('PEXPIRE', KEYS[1], int(hold_ttl + record_ttl))
redis.call('ZADD', KEYS[2], 'XX', int(deadline), rid)
redis.call('PEXPIRE', KEYS[2], int(hold_ttl + record_ttl))
return mp_pack({s = 'held', lost = lost, dl = deadline})
