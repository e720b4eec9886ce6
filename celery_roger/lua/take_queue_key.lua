--! KEYS: qkeys qk_pending stats qk_until
--! ARGV: qkey job grace_ms
-- Publish with a queue key, step 1: atomically check and take the key for a job.
-- The key is taken "pending" until the publisher confirms the broker accepted the
-- message; a pending key whose publisher died is free again after grace_ms.
-- KEYS: qkeys (hash key -> job id), qk_pending (zset key -> deadline ms), stats (hash)
-- ARGV: queue key, job id, grace_ms
-- Returns the id of the job holding the key, or false when it was taken for A.job.
local now = now_ms()
local holder = redis.call('HGET', K.qkeys, A.qkey)
if holder and holder ~= A.job then
  local deadline = redis.call('ZSCORE', K.qk_pending, A.qkey)
  if not deadline or tonumber(deadline) > now then
    redis.call('HINCRBY', K.stats, 'dedup_refused', 1)
    return holder
  end
end
redis.call('HSET', K.qkeys, A.qkey, A.job)
redis.call('ZADD', K.qk_pending, now + tonumber(A.grace_ms), A.qkey)
-- A window of an earlier holder is over (or was ended by hand): the confirm of this
-- publish sets its own, if it has one.
redis.call('ZREM', K.qk_until, A.qkey)
return false
