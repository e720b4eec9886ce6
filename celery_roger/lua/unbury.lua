-- Requeue a buried job, step 2: its message is in the broker; remove its entry and
-- confirm the queue key step 1 took (held until the job's attempt ends).
-- KEYS: buried, buried:<queue>, buried_msg, qkeys, qk_pending
-- ARGV: job id, queue key or ''
local removed = redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if ARGV[2] ~= '' and redis.call('HGET', KEYS[4], ARGV[2]) == ARGV[1] then
  redis.call('ZREM', KEYS[5], ARGV[2])
end
return removed
