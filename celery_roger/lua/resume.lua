-- Resume a queue: forget its pause and hand its held jobs, in order, to the retry set
-- as due now, from where they are published (by the caller, or any worker's tick)
-- exactly as due retries are. Also used to release jobs held for a queue that is no
-- longer paused (a job parked while the resume ran).
-- KEYS: paused, pausedjobs:<queue>, paused_msg, retry, retry_msg, paused_lists
-- ARGV: queue, '1' to resume ('0' only releases held jobs if the queue is not paused)
-- Returns how many jobs were released.
if ARGV[2] == '1' then
  redis.call('HDEL', KEYS[1], ARGV[1])
elseif redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  return 0
end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local jobs = redis.call('LRANGE', KEYS[2], 0, -1)
for i, job in ipairs(jobs) do
  local stored = redis.call('HGET', KEYS[3], job)
  if stored then
    redis.call('HSET', KEYS[5], job, stored)
    redis.call('ZADD', KEYS[4], now - #jobs + i, job)
    redis.call('HDEL', KEYS[3], job)
  end
end
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[6], ARGV[1])
return #jobs
