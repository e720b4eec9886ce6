--! KEYS: buried buried_queue buried_msg buried_dropped buried_queues
--! ARGV: job entry cap queue task error_type prefix hist_ms
-- Bury a job whose retries are exhausted: keep its entry, newest first, per queue and
-- across queues, in the filter indexes (task, error type); drop the queue's oldest entries
-- beyond the cap and count the drops.
-- KEYS: buried (zset job -> time in us, all queues), buried:<queue> (zset), buried_msg (hash job
--       -> entry json), buried_dropped (hash queue -> count), buried_queues (set)
-- ARGV: job id, entry json, cap, queue, task name, error type, key prefix
-- Returns the ids of the entries dropped to respect the cap.
local now = now_us()  -- microseconds: newest first, even within a millisecond
redis.call('ZADD', K.buried, now, A.job)
redis.call('ZADD', K.buried_queue, now, A.job)
redis.call('HSET', K.buried_msg, A.job, A.entry)
redis.call('SADD', K.buried_queues, A.queue)
buried_index_add(A.prefix, A.job, A.task, A.error_type, A.queue, now)
history(K.buried, 'buried', A.job, A.hist_ms, 'buried', '', A.error_type)
local excess = redis.call('ZCARD', K.buried_queue) - tonumber(A.cap)
local dropped = {}
if excess > 0 then
  dropped = redis.call('ZRANGE', K.buried_queue, 0, excess - 1)
  for _, job in ipairs(dropped) do
    redis.call('ZREM', K.buried_queue, job)
    redis.call('ZREM', K.buried, job)
    redis.call('HDEL', K.buried_msg, job)
    buried_index_remove(A.prefix, job)
  end
  redis.call('HINCRBY', K.buried_dropped, A.queue, #dropped)
end
return dropped
