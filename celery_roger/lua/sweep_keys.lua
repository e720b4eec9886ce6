--! KEYS: qkeys qk_pending running msg held_msg buried_msg orphan_suspects orphan_suspect_keys sweep holders promoting
--! ARGV: period_ms threshold_ms count
-- Sweep for orphaned keys, one bounded step. A key whose job is nowhere in roger's
-- state becomes a suspect, stamped with when it was first seen so; a suspect still
-- nowhere after `threshold` ms is returned for the caller to look for in the broker
-- (queue lists and unacked messages) before orphan.lua acts on it:
--   * a confirmed queue key whose job is not running, parked, promoted, held for a pause
--     or buried (a message lost in flight, purged, dropped by the broker);
--   * an execution key whose holder is neither running nor on its way (a promoted job
--     whose message was lost in flight after its publisher confirmed it).
-- One worker sweeps at a time, one step each `period` ms, HSCAN-ing `count` entries of
-- each hash from where the last step ended, so a step's cost does not grow with traffic
-- or with the number of keys held.
-- KEYS: qkeys, qk_pending, running, msg, held_msg, buried_msg, orphan_suspects (zset
--       'q:' or 'e:' .. job -> first seen ms), orphan_suspect_keys (hash same -> key),
--       sweep (hash: next, cursor, ecursor), holders, promoting
-- ARGV: period_ms, threshold_ms, count
-- Returns {kind ('q' or 'e'), job id, key, ...} of suspects old enough for the broker
-- check, or false when it is not this caller's turn.
local now = now_ms()
local k = {qk_pending = K.qk_pending, running = K.running, msg = K.msg, held_msg = K.held_msg,
  buried_msg = K.buried_msg, promoting = K.promoting}
local next_step = tonumber(redis.call('HGET', K.sweep, 'next') or '0') or 0
if next_step > now then return false end
redis.call('HSET', K.sweep, 'next', now + tonumber(A.period_ms))

local old = {}
local function forget(member)
  redis.call('ZREM', K.orphan_suspects, member)
  redis.call('HDEL', K.orphan_suspect_keys, member)
end
local function suspect(kind, job, key)
  local member = kind .. ':' .. job
  local first = redis.call('ZSCORE', K.orphan_suspects, member)
  local known = redis.call('HGET', K.orphan_suspect_keys, member)
  if first and known and known ~= key and kind == 'e'
      and redis.call('HGET', K.holders, known) == job then
    return  -- it holds another slot already suspected: that one ages first
  end
  if not first or known ~= key then
    redis.call('ZADD', K.orphan_suspects, now, member)
    redis.call('HSET', K.orphan_suspect_keys, member, key)
  elseif now - tonumber(first) >= tonumber(A.threshold_ms) then
    table.insert(old, kind)
    table.insert(old, job)
    table.insert(old, key)
  end
end
local function clear(kind, job, key)
  if redis.call('HGET', K.orphan_suspect_keys, kind .. ':' .. job) == key then forget(kind .. ':' .. job) end
end
local function scan(hash, cursor_field)
  local cursor = redis.call('HGET', K.sweep, cursor_field) or '0'
  local reply = redis.call('HSCAN', hash, cursor, 'COUNT', tonumber(A.count))
  redis.call('HSET', K.sweep, cursor_field, reply[1])
  return reply[2], reply[1] == '0'
end

local entries, qpass = scan(K.qkeys, 'cursor')
for i = 1, #entries, 2 do
  local qkey, job = entries[i], entries[i + 1]
  if queue_key_accounted(k, qkey, job) then
    clear('q', job, qkey)
  else
    suspect('q', job, qkey)
  end
end
local holders, epass = scan(K.holders, 'ecursor')
for i = 1, #holders, 2 do
  local ekey, job = holders[i], holders[i + 1]
  if holder_accounted(k, job) then
    clear('e', job, ekey)
  else
    suspect('e', job, ekey)
  end
end
if qpass or epass then
  -- A pass is done: forget suspects whose key was released or taken by another job.
  for _, member in ipairs(redis.call('ZRANGE', K.orphan_suspects, 0, 999)) do
    local key = redis.call('HGET', K.orphan_suspect_keys, member)
    local kind, job = string.sub(member, 1, 1), string.sub(member, 3)
    local hash = (kind == 'e') and K.holders or K.qkeys
    if not key or redis.call('HGET', hash, key) ~= job then forget(member) end
  end
end
return old
