-- Publish with a queue key, step 1: atomically check and take the key for a job.
-- The key is taken "pending" until the publisher confirms the broker accepted the
-- message; a pending key whose publisher died is free again after grace_ms.
-- KEYS: qkeys (hash key -> job id), qk_pending (zset key -> deadline ms), stats (hash)
-- ARGV: queue key, job id, grace_ms
-- Returns the id of the job holding the key, or false when it was taken for ARGV[2].
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local holder = redis.call('HGET', KEYS[1], ARGV[1])
if holder and holder ~= ARGV[2] then
  local deadline = redis.call('ZSCORE', KEYS[2], ARGV[1])
  if not deadline or tonumber(deadline) > now then
    redis.call('HINCRBY', KEYS[3], 'dedup_refused', 1)
    return holder
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
return false
