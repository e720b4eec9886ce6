--! KEYS: buried buried_queue buried_msg buried_queues
--! ARGV: queue
-- Delete every buried job of one queue.
-- KEYS: buried, buried:<queue>, buried_msg, buried_queues
-- ARGV: queue
-- Returns how many were deleted.
local jobs = redis.call('ZRANGE', K.buried_queue, 0, -1)
for _, job in ipairs(jobs) do
  redis.call('ZREM', K.buried, job)
  redis.call('HDEL', K.buried_msg, job)
end
redis.call('DEL', K.buried_queue)
redis.call('SREM', K.buried_queues, A.queue)
return #jobs
