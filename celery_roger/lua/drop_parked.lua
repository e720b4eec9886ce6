--! KEYS: parked msg qkeys qk_pending qk_until parked_count
--! ARGV: job qkey queue
-- Drop a parked job (purge): take it out of its execution key's line, forget its
-- message and release its queue key if it holds it.
-- KEYS: parked (for its execution key), msg, qkeys, qk_pending, parked_count
-- ARGV: job id, queue key or '', queue
-- Returns 1 when the job was parked there, else 0.
local removed = redis.call('LREM', K.parked, 0, A.job)
redis.call('HDEL', K.msg, A.job)
release_queue_key(K.qkeys, K.qk_pending, A.qkey, A.job, K.qk_until)
if removed > 0 then
  redis.call('HINCRBY', K.parked_count, A.queue, -1)
  return 1
end
return 0
