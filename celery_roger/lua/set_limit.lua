--! KEYS: limits holders slots msg promoting parked parked_count
--! ARGV: ekey limit grace_ms
-- An operator sets (or clears, A.limit = '') the live limit of execution key A.ekey, for
-- the whole cluster: it overrides the limit its jobs were published with. A raised limit
-- takes effect at once for jobs already parked: each free slot within it is handed to
-- the next in line. A lowered one takes effect as jobs end (finish.lua retires slots
-- above it); running jobs are never stopped.
-- KEYS: limits, holders, slots, msg, promoting, parked (this key's line), parked_count
-- ARGV: execution key, limit (an integer >= 1, or '' to clear), grace_ms
-- Returns {job, message, how, job, message, how, ...}: the jobs promoted (as finish.lua).
if A.limit == '' then
  redis.call('HDEL', K.limits, A.ekey)
  return {}
end
local limit = math.floor(tonumber(A.limit))
redis.call('HSET', K.limits, A.ekey, limit)
local promoted = {}
for i = 1, limit do
  if redis.call('LLEN', K.parked) == 0 then break end
  local slot = slot_name(A.ekey, i)
  if not redis.call('HGET', K.holders, slot) then
    local nxt, message, how = hand_on({
      parked = K.parked, msg = K.msg, parked_count = K.parked_count, holders = K.holders,
      slots = K.slots, promoting = K.promoting}, A.ekey, slot, tonumber(A.grace_ms))
    if nxt then
      table.insert(promoted, nxt)
      table.insert(promoted, message)
      table.insert(promoted, how)
    end
  end
end
return promoted
