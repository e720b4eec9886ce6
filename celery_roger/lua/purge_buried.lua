--! KEYS: buried buried_queue buried_msg buried_queues
--! ARGV: queue prefix
-- Delete every buried job of one queue, with its filter indexes.
-- KEYS: buried, buried:<queue>, buried_msg, buried_queues
-- ARGV: queue, key prefix
-- Returns how many were deleted.
local jobs = redis.call('ZRANGE', K.buried_queue, 0, -1)
for _, job in ipairs(jobs) do
  redis.call('ZREM', K.buried, job)
  redis.call('HDEL', K.buried_msg, job)
  buried_index_remove(A.prefix, job)
end
redis.call('DEL', K.buried_queue)
redis.call('SREM', K.buried_queues, A.queue)
return #jobs
