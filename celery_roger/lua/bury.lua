-- Bury a job whose retries are exhausted: keep its entry, newest first, per queue and
-- across queues; drop the queue's oldest entries beyond the cap and count the drops.
-- KEYS: buried (zset job -> time in us, all queues), buried:<queue> (zset), buried_msg (hash job
--       -> entry json), buried_dropped (hash queue -> count), buried_queues (set)
-- ARGV: job id, entry json, cap, queue
-- Returns the ids of the entries dropped to respect the cap.
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]  -- microseconds: newest first, even within a millisecond
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZADD', KEYS[2], now, ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[5], ARGV[4])
local excess = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[3])
local dropped = {}
if excess > 0 then
  dropped = redis.call('ZRANGE', KEYS[2], 0, excess - 1)
  for _, job in ipairs(dropped) do
    redis.call('ZREM', KEYS[2], job)
    redis.call('ZREM', KEYS[1], job)
    redis.call('HDEL', KEYS[3], job)
  end
  redis.call('HINCRBY', KEYS[4], ARGV[4], #dropped)
end
return dropped
