--! KEYS: qkeys qk_pending qk_until running msg held_msg buried_msg orphan_suspects orphan_suspect_keys stats holders promoting slots
--! ARGV: kind job key verdict
-- The broker check of a suspect found by sweep_keys.lua is done. 'keep': the job is in
-- the broker, waiting its turn: its wait starts again. 'release': the job is nowhere;
-- if that is still so,
--   * a queue key ('q') is released (returns 1);
--   * an execution key ('e') whose holder's message is kept (a promoted job lost in
--     flight) is promoted again: the next tick publishes it (returns 2); one whose holder
--     left nothing to publish again returns 3: the caller finishes it, handing the key on.
-- KEYS: qkeys, qk_pending, running, msg, held_msg, buried_msg, orphan_suspects,
--       orphan_suspect_keys, stats, holders, promoting
-- ARGV: kind ('q' or 'e'), job id, key, 'release' or 'keep'
-- Returns 0 when nothing was done.
local kind, job, key = A.kind, A.job, A.key
local k = {qk_pending = K.qk_pending, running = K.running, msg = K.msg, held_msg = K.held_msg,
  buried_msg = K.buried_msg, promoting = K.promoting}
local member = kind .. ':' .. job
if A.verdict == 'keep' then
  redis.call('ZADD', K.orphan_suspects, 'XX', now_ms(), member)
  return 0
end
redis.call('ZREM', K.orphan_suspects, member)
redis.call('HDEL', K.orphan_suspect_keys, member)
if kind == 'e' then
  if redis.call('HGET', K.holders, key) ~= job or holder_accounted(k, job) then return 0 end
  redis.call('HINCRBY', K.stats, 'orphaned_keys', 1)
  -- What finishes or admits the job next finds this very slot (`slots`, lib.lua).
  local slot_one = string.match(key, '^(.*)%z#%d+$')
  take_slot(K.holders, K.slots, slot_one or key, key, job)
  if redis.call('HEXISTS', K.msg, job) == 1 then
    redis.call('ZADD', K.promoting, now_ms(), job)
    return 2
  end
  return 3
end
if redis.call('HGET', K.qkeys, key) ~= job or queue_key_accounted(k, key, job) then
  return 0
end
local until_ms = tonumber(redis.call('ZSCORE', K.qk_until, key))
if until_ms and until_ms > now_ms() then
  -- A throttle window: the key is not an orphan until it ends (it stays taken anyway).
  return 0
end
redis.call('ZREM', K.qk_until, key)
redis.call('HDEL', K.qkeys, key)
redis.call('HINCRBY', K.stats, 'orphaned_keys', 1)
return 1
