--! KEYS: paused
--! ARGV: queue reason
-- Pause a queue for the whole cluster (workers apply it at their next tick, or at once
-- through the broadcast that follows).
-- KEYS: paused (hash queue -> {"at", "reason"})
-- ARGV: queue, reason json string or 'null'
local at = now_s()
redis.call('HSET', K.paused, A.queue, '{"at":' .. string.format('%.6f', at) .. ',"reason":'
  .. A.reason .. '}')
return 1
