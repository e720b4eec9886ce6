--! KEYS: qkeys qk_pending
--! ARGV: qkey job deadline_ms
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
if tonumber(A.deadline_ms) > 0 then
  local now = now_ms()
  redis.call('ZADD', K.qk_pending, now + tonumber(A.deadline_ms), A.qkey)
else
  redis.call('ZREM', K.qk_pending, A.qkey)
end
return 1
