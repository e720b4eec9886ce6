-- Start: the check a job passes in its own process right before its body runs, for
-- what changed after its admission (a cancel, a pause).
-- KEYS: cancelled, cancel_reported, paused, stats
-- ARGV: job id, queue
-- Returns {'cancelled', 1 if this call claims its on_cancel}, {'paused'} or {'run'}.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local cancelled = redis.call('ZSCORE', KEYS[1], ARGV[1])
if cancelled and tonumber(cancelled) > now then
  local first = redis.call('ZADD', KEYS[2], 'NX', cancelled, ARGV[1])
  if first == 1 then redis.call('HINCRBY', KEYS[4], 'cancelled', 1) end
  return {'cancelled', first}
end
if ARGV[2] ~= '' and redis.call('HEXISTS', KEYS[3], ARGV[2]) == 1 then
  return {'paused'}
end
return {'run'}
