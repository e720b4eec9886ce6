-- Drop a parked job (purge): take it out of its execution key's line, forget its
-- message and release its queue key if it holds it.
-- KEYS: parked (for its execution key), msg, qkeys, qk_pending, parked_count
-- ARGV: job id, queue key or '', queue
-- Returns 1 when the job was parked there, else 0.
local removed = redis.call('LREM', KEYS[1], 0, ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
if ARGV[2] ~= '' and redis.call('HGET', KEYS[3], ARGV[2]) == ARGV[1] then
  redis.call('HDEL', KEYS[3], ARGV[2])
  redis.call('ZREM', KEYS[4], ARGV[2])
end
if removed > 0 then
  redis.call('HINCRBY', KEYS[5], ARGV[3], -1)
  return 1
end
return 0
