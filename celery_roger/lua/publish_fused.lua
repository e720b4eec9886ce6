--! KEYS: fuse qkeys qk_pending qk_until stats queue
--! ARGV: token qkey job payload deadline_ms window_ms hist_ms
--! LEAN
-- Publish with a queue key on a Redis broker that is roger's Redis, in one round trip:
-- take the key and push the message together, so the key is never pending.
-- KEYS: fuse (the token proving broker and roger state share this database), qkeys,
--   qk_pending, stats, queue (the broker's list for the message, not a roger key)
-- ARGV: the token this publisher read, queue key, job id, the message as kombu pushes
--   it, deadline in ms from now or '0' (as confirm_queue_key.lua)
-- Returns {'sent'}, {'replay'} (this job already holds the key: an earlier try of this
-- very publish pushed it, whose reply was lost), {'refused', holder}, or {'unproven'}
-- (the token is not here: another database, a FLUSHDB, a restart; nothing was done).
-- Lean (no lib.lua, no key-type guard: it is the publish's hot path): on a key of the
-- wrong type Redis answers an error, and the publisher takes the guarded long road
-- (take_queue_key.lua quarantines the key), which also completes what this script did
-- before the error (the key taken for this very job).
if redis.call('GET', K.fuse) ~= A.token then
  return {'unproven'}
end
local now = now_ms()
local holder = redis.call('HGET', K.qkeys, A.qkey)
if holder == A.job then
  return {'replay'}
end
if holder then
  local deadline = redis.call('ZSCORE', K.qk_pending, A.qkey)
  if not deadline or tonumber(deadline) > now then
    redis.call('HINCRBY', K.stats, 'dedup_refused', 1)
    return {'refused', holder}
  end
end
redis.call('HSET', K.qkeys, A.qkey, A.job)
if tonumber(A.deadline_ms) > 0 then
  redis.call('ZADD', K.qk_pending, now + tonumber(A.deadline_ms), A.qkey)
else
  redis.call('ZREM', K.qk_pending, A.qkey)
end
if tonumber(A.window_ms) > 0 then  -- a throttle window (confirm_queue_key.lua)
  redis.call('ZADD', K.qk_until, now + tonumber(A.window_ms), A.qkey)
else
  redis.call('ZREM', K.qk_until, A.qkey)
end
redis.call('LPUSH', K.queue, A.payload)
if tonumber(A.hist_ms) > 0 then  -- its history (lib.lua's history(), inlined: a lean script)
  local hist = string.sub(K.qkeys, 1, #K.qkeys - 5) .. 'hist:' .. A.job
  if type(redis.pcall('RPUSH', hist, now .. '\tpublished\t\tqueue key ' ..
      string.gsub(A.qkey, '[\t\n]', ' '))) == 'number' then
    redis.call('PEXPIRE', hist, A.hist_ms)
  end
end
return {'sent'}
