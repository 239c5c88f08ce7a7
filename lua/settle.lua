-- settle / release: finish a held reservation of one slot group, exactly once.
--
-- KEYS[1]  reservation record of this request in this group
-- KEYS[2]  pending holds of this group
-- ARGV[1]  request id
-- ARGV[2]  now in ms, or 0 to use Redis's clock
-- ARGV[3]  'settle': limits with a measure named in the actuals take that amount instead of
--          their estimate (a window's bucket and a budget's period are the ones reserved);
--          'release': every reserved amount is refunded
--          'cancel': refunded and forgotten, with no ledger entry: the other slot groups of
--          the request were refused, so it was never admitted
-- ARGV[4]  msgpack map measure -> actual amount (integers; ignored by 'release')
-- ARGV[5]  result ttl, ms: how long the finished record answers repeated calls
-- ARGV[6]  opaque bytes for the ledger entry (actual token counts, outcome), if it has one
-- ARGV[7]  '1' to abandon: with no record, leave a 'released' one for ARGV[5] ms, so that an
--          acquire of this id that reaches Redis later (sent before a timeout) takes nothing
--
-- Leases are freed in both modes. Returns a msgpack map:
--   s      final status: 'settled', 'released' or 'expired'; 'unknown' if no record exists
--   first  1 if this call finished the reservation, 0 if an earlier call (or expiry) did
--   t0, t1 acquisition and finish times (ms); est, out: amount per measure, reserved and charged
--   meta   the caller metadata given at acquisition
-- A repeated call changes nothing and returns the first outcome.

local rid, now, mode = ARGV[1], clock(ARGV[2]), ARGV[3]
local rec = record_load(KEYS[1])
if not rec then
  if ARGV[7] == '1' then
    redis.call('HSET', KEYS[1], 's', 'released', 't0', now, 't1', now)
    redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[5]))
  end
  return mp_pack({s = 'unknown', first = 0})
end
if rec.s ~= 'held' then
  return mp_pack(record_fields(rec))
end
local reserved, charged = record_finish(rec, KEYS[1], rid, now, mode, mp_unpack(ARGV[4]),
  tonumber(ARGV[5]), ARGV[6])
redis.call('ZREM', KEYS[2], rid)
-- record_fields, with the maps at hand rather than unpacked again ('cancel' leaves none)
return mp_pack({s = rec.s, first = 1, t0 = tonumber(rec.t0), t1 = tonumber(rec.t1),
  est = rec.est and reserved, out = rec.out and charged, meta = rec.meta})
