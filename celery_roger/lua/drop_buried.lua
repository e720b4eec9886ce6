--! KEYS: buried buried_msg buried_queues
--! ARGV: ...
-- Delete the buried jobs named (the console's bulk purge), with their filter indexes.
-- KEYS: buried, buried_msg, buried_queues
-- ARGV: key prefix, then job ids
-- Returns how many of them were buried.
local prefix = ARGV[1]
local removed = 0
for i = 2, #ARGV do
  local job = ARGV[i]
  if redis.call('HDEL', K.buried_msg, job) == 1 then
    removed = removed + 1
    redis.call('ZREM', K.buried, job)
    local queue = buried_index_remove(prefix, job)
    if queue then
      redis.call('ZREM', buried_index_key(prefix, 'buried:' .. queue), job)
    else  -- buried before the indexes existed: its queue is one of buried_queues
      for _, q in ipairs(redis.call('SMEMBERS', K.buried_queues)) do
        redis.call('ZREM', buried_index_key(prefix, 'buried:' .. q), job)
      end
    end
  end
end
return removed
