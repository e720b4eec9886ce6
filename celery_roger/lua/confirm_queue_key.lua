-- Publish with a queue key, step 2: the broker accepted the message, so the key is
-- held until the job's attempt ends (no deadline any more), or, for a job with an
-- expiry (which a broker such as RabbitMQ may drop unseen), until that expiry plus the
-- grace unless a worker admits the job first (which removes the deadline).
-- KEYS: qkeys, qk_pending
-- ARGV: queue key, job id, deadline in ms from now or '0'
-- Returns 1 when the job still held the key, 0 when it had lost it.
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then
  return 0
end
if tonumber(ARGV[3]) > 0 then
  local t = redis.call('TIME')
  local now = t[1] * 1000 + math.floor(t[2] / 1000)
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
else
  redis.call('ZREM', KEYS[2], ARGV[1])
end
return 1
