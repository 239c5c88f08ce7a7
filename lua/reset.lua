-- reset: lower the spend of budget periods, keeping the holds of requests in flight.
--
-- KEYS     budget period keys (<budget key>:<period start ms>), any number, one slot
-- ARGV[1]  the spend each period is left with at most (nano-dollars); 0 starts it again
--
-- A period's 'u' is spent plus held and 'h' what requests in flight hold: spent becomes
-- min(spent, ARGV[1]) and the holds stay, so a request held before the reset settles into the
-- period as usual (its estimate leaves 'h', its cost joins 'u') and is counted once, after the
-- reset. What was taken off is added to 'r', so the ledger check can still match the period's
-- entries (spent + r = the ledger's sum). A period with no key has nothing to lower.
-- Returns, per key, what was taken off.

local most = tonumber(ARGV[1])
local out = {}
for i, key in ipairs(KEYS) do
  local v = redis.call('HMGET', key, 'u', 'h', 'r')
  local u = tonumber(v[1])
  out[i] = 0
  if u then
    local h = tonumber(v[2]) or 0
    local spent = u - h
    if spent > most then
      local off = spent - most
      redis.call('HSET', key, 'u', int(h + most), 'r', int((tonumber(v[3]) or 0) + off))
      out[i] = off
    end
  end
end
return mp_pack(out)
