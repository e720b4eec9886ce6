-- Delete every buried job of one queue.
-- KEYS: buried, buried:<queue>, buried_msg, buried_queues
-- ARGV: queue
-- Returns how many were deleted.
local jobs = redis.call('ZRANGE', KEYS[2], 0, -1)
for _, job in ipairs(jobs) do
  redis.call('ZREM', KEYS[1], job)
  redis.call('HDEL', KEYS[3], job)
end
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[4], ARGV[1])
return #jobs
