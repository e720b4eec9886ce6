-- Release a queue key held by a job (compare-and-delete), or by anyone when ARGV[2] is ''.
-- KEYS: qkeys, qk_pending
-- ARGV: queue key, job id or ''
-- Returns the id of the job that held the key, or false.
local holder = redis.call('HGET', KEYS[1], ARGV[1])
if not holder or (ARGV[2] ~= '' and holder ~= ARGV[2]) then
  return false
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return holder
