--! KEYS: qkeys qk_pending qk_until
--! ARGV: qkey job deadline_ms window_ms hist_ms
-- Publish with a queue key, step 2: the broker accepted the message, so the key is
-- held until the job's attempt ends (no deadline any more), or, for a job with an
-- expiry (which a broker such as RabbitMQ may drop unseen), until that expiry plus the
-- grace unless a worker admits the job first (which removes the deadline).
-- KEYS: qkeys, qk_pending
-- ARGV: queue key, job id, deadline in ms from now or '0'
-- Returns 1 when the job still held the key, 0 when it had lost it.
if redis.call('HGET', K.qkeys, A.qkey) ~= A.job then
  return 0
end
local now = now_ms()
if tonumber(A.window_ms) > 0 then
  -- queue_key_until=seconds: the key stays taken for the window, whatever becomes of the
  -- job (release_queue_key in lib.lua), and until the job's attempt ends.
  redis.call('ZADD', K.qk_until, now + tonumber(A.window_ms), A.qkey)
end
if tonumber(A.deadline_ms) > 0 then
  redis.call('ZADD', K.qk_pending, now + tonumber(A.deadline_ms), A.qkey)
else
  redis.call('ZREM', K.qk_pending, A.qkey)
end
history(K.qkeys, 'qkeys', A.job, A.hist_ms, 'published', '', 'queue key ' .. A.qkey)
return 1
