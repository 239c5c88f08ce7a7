-- budget_hold: the BudgetManager's check-and-hold, for client_type="redis". One user's cost
-- so far plus what calls in flight hold, plus this call's projected cost, must fit the budget;
-- then this call's hold is added, in the same step, so concurrent callers cannot overspend.
-- Run on its own (not prepended with lib.lua).
--
-- KEYS[1]  the user's cost hash for the current period (field _total, nano-dollars)
-- KEYS[2]  the user's holds: sorted set, hold id -> expiry (ms)
-- KEYS[3]  the user's hold amounts: hash, hold id -> nano-dollars
-- ARGV[1]  hold id
-- ARGV[2]  projected cost of the call, nano-dollars
-- ARGV[3]  the user's total budget, nano-dollars
-- ARGV[4]  now, ms
-- ARGV[5]  the hold's expiry, ms: a hold its process never finished stops counting then
--
-- Returns {1 held / 0 refused, cost so far, held by others}, nano-dollars.

local now = tonumber(ARGV[4])
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do
  redis.call('HDEL', KEYS[3], id)
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)

local spent = tonumber(redis.call('HGET', KEYS[1], '_total') or '0')
local held = 0
for _, amount in ipairs(redis.call('HVALS', KEYS[3])) do
  held = held + tonumber(amount)
end
if spent + held + tonumber(ARGV[2]) > tonumber(ARGV[3]) then
  return {0, spent, held}
end
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
local last = tonumber(redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')[2])
redis.call('PEXPIREAT', KEYS[2], last)
redis.call('PEXPIREAT', KEYS[3], last)
return {1, spent, held}
