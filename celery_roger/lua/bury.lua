--! KEYS: buried buried_queue buried_msg buried_dropped buried_queues
--! ARGV: job entry cap queue
-- Bury a job whose retries are exhausted: keep its entry, newest first, per queue and
-- across queues; drop the queue's oldest entries beyond the cap and count the drops.
-- KEYS: buried (zset job -> time in us, all queues), buried:<queue> (zset), buried_msg (hash job
--       -> entry json), buried_dropped (hash queue -> count), buried_queues (set)
-- ARGV: job id, entry json, cap, queue
-- Returns the ids of the entries dropped to respect the cap.
local now = now_us()  -- microseconds: newest first, even within a millisecond
redis.call('ZADD', K.buried, now, A.job)
redis.call('ZADD', K.buried_queue, now, A.job)
redis.call('HSET', K.buried_msg, A.job, A.entry)
redis.call('SADD', K.buried_queues, A.queue)
local excess = redis.call('ZCARD', K.buried_queue) - tonumber(A.cap)
local dropped = {}
if excess > 0 then
  dropped = redis.call('ZRANGE', K.buried_queue, 0, excess - 1)
  for _, job in ipairs(dropped) do
    redis.call('ZREM', K.buried_queue, job)
    redis.call('ZREM', K.buried, job)
    redis.call('HDEL', K.buried_msg, job)
  end
  redis.call('HINCRBY', K.buried_dropped, A.queue, #dropped)
end
return dropped
