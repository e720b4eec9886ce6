--! KEYS: schema workers old_held holders old_paused_msg held_msg old_paused_lists held_queues
--! ARGV: prefix version
-- Migrate: move the state an earlier celery-roger kept under older key names to today's
-- names (docs/design.md, "Renamed keys"), once per partition, when a worker starts.
-- Refused while workers that may still write the older names hold a live lease: a
-- partition without the schema mark is run by workers of an earlier version only (a
-- worker of this version marks it whenever it registers, renew.lua).
-- KEYS: schema (hash: version), workers, held (before 0.2: execution key -> holder),
--       holders, paused_msg (before 0.2), held_msg, paused_lists (before 0.2), held_queues
-- ARGV: key prefix, this schema version
-- Returns {'current'}, {'refused', live instance, ...} or {'migrated', keys moved,
-- keys left (of another type than expected)}.
local prefix, version = A.prefix, A.version
if redis.call('HGET', K.schema, 'version') == version then return {'current'} end
local live = redis.call('ZRANGEBYSCORE', K.workers, '(' .. now_ms(), '+inf', 'LIMIT', 0, 20)
if #live > 0 then
  table.insert(live, 1, 'refused')
  return live
end
local moved, left = 0, 0
local function move_hash(old, new)
  local kind = redis.call('TYPE', old).ok
  if kind == 'none' then return end
  if kind ~= 'hash' then left = left + 1 return end
  local fields = redis.call('HGETALL', old)
  for i = 1, #fields, 2 do redis.call('HSETNX', new, fields[i], fields[i + 1]) end
  redis.call('DEL', old)
  moved = moved + 1
end
local function move_list(old, new)
  local kind = redis.call('TYPE', old).ok
  if kind == 'none' then return end
  if kind ~= 'list' then left = left + 1 return end
  for _, item in ipairs(redis.call('LRANGE', old, 0, -1)) do redis.call('RPUSH', new, item) end
  redis.call('DEL', old)
  moved = moved + 1
end
move_hash(K.old_held, K.holders)
move_hash(K.old_paused_msg, K.held_msg)
local kind = redis.call('TYPE', K.old_paused_lists).ok
if kind == 'set' then
  for _, queue in ipairs(redis.call('SMEMBERS', K.old_paused_lists)) do
    move_list(prefix .. 'pausedjobs:' .. queue, prefix .. 'held:' .. queue)
    redis.call('SADD', K.held_queues, queue)
  end
  redis.call('DEL', K.old_paused_lists)
  moved = moved + 1
elseif kind ~= 'none' then
  left = left + 1
end
redis.call('HSET', K.schema, 'version', version)
return {'migrated', moved, left}
