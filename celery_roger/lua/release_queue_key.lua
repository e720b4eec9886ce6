--! KEYS: qkeys qk_pending qk_until
--! ARGV: qkey job
-- Release a queue key held by a job (compare-and-delete), or by anyone when A.job is ''.
-- KEYS: qkeys, qk_pending
-- ARGV: queue key, job id or ''
-- Returns the id of the job that held the key, or false.
local holder = redis.call('HGET', K.qkeys, A.qkey)
if not holder or (A.job ~= '' and holder ~= A.job) then
  return false
end
redis.call('HDEL', K.qkeys, A.qkey)
redis.call('ZREM', K.qk_pending, A.qkey)
redis.call('ZREM', K.qk_until, A.qkey)  -- a release by hand ends a throttle window too
return holder
