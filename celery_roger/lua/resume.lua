--! KEYS: paused held_queue held_msg retry retry_msg held_queues
--! ARGV: queue resume
-- Resume a queue: forget its pause and hand its held jobs, in order, to the retry set
-- as due now, from where they are published (by the caller, or any worker's tick)
-- exactly as due retries are. Also used to release jobs held for a queue that is no
-- longer paused (a job parked while the resume ran).
-- KEYS: paused, held:<queue>, held_msg, retry, retry_msg, held_queues
-- ARGV: queue, '1' to resume ('0' only releases held jobs if the queue is not paused)
-- Returns how many jobs were released.
if A.resume == '1' then
  redis.call('HDEL', K.paused, A.queue)
elseif redis.call('HEXISTS', K.paused, A.queue) == 1 then
  return 0
end
local now = now_ms()
local jobs = redis.call('LRANGE', K.held_queue, 0, -1)
for i, job in ipairs(jobs) do
  local stored = redis.call('HGET', K.held_msg, job)
  if stored then
    redis.call('HSET', K.retry_msg, job, stored)
    redis.call('ZADD', K.retry, now - #jobs + i, job)
    redis.call('HDEL', K.held_msg, job)
  end
end
redis.call('DEL', K.held_queue)
redis.call('SREM', K.held_queues, A.queue)
return #jobs
