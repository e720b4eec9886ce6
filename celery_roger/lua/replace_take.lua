--! KEYS: qkeys qk_pending qk_until qk_prev running stats
--! ARGV: qkey job grace_ms
-- Publish with on_duplicate="replace", step 1: the newest publish wins its queue key.
--   * key free (or its publisher died): taken for A.job, pending, as take_queue_key.lua;
--   * held by a job that has not started: taken over for A.job, pending; the holder is
--     remembered in `qk_prev` so a publisher that dies before sending gives it back
--     (tick.lua); the caller cancels the holder once its own publish succeeded;
--   * held by a running job: nothing changes here. The new job is sent and waits behind
--     it when it reaches a worker (admit.lua: `qkwait:<key>`, one job, the newest);
--   * inside a throttle window (queue_key_until=seconds): refused, as any duplicate.
-- KEYS: qkeys, qk_pending, qk_until, qk_prev (hash key -> replaced holder), running,
--       stats
-- ARGV: queue key, job id, grace_ms
-- Returns {'took'}, {'replacing', holder}, {'behind', holder} or {'refused', holder}.
local now = now_ms()
local holder = redis.call('HGET', K.qkeys, A.qkey)
if holder == A.job then return {'took'} end
if holder then
  local deadline = tonumber(redis.call('ZSCORE', K.qk_pending, A.qkey))
  local window = tonumber(redis.call('ZSCORE', K.qk_until, A.qkey))
  if window and window > now then
    redis.call('HINCRBY', K.stats, 'dedup_refused', 1)
    return {'refused', holder}
  end
  if deadline and deadline <= now then
    -- Its publisher died before the broker had it: the holder it displaced, if any,
    -- has the key back (as tick.lua would do).
    holder = redis.call('HGET', K.qk_prev, A.qkey)
    redis.call('HDEL', K.qk_prev, A.qkey)
    if holder then redis.call('HSET', K.qkeys, A.qkey, holder) end
  end
end
if holder and redis.call('HEXISTS', K.running, holder) == 1 then
  return {'behind', holder}
end
redis.call('HSET', K.qkeys, A.qkey, A.job)
redis.call('ZADD', K.qk_pending, now + tonumber(A.grace_ms), A.qkey)
redis.call('ZREM', K.qk_until, A.qkey)
if not holder then return {'took'} end
redis.call('HINCRBY', K.stats, 'replaced', 1)
redis.call('HSET', K.qk_prev, A.qkey, holder)
return {'replacing', holder}
