--! KEYS: running holders slots limits msg promoting qkeys qk_pending qk_until parked parked_count qkwait
--! ARGV: job ek qkey grace_ms force instance outcome hist_ms
-- Finish: a job's attempt ended (any outcome). Forget it as running, release its queue
-- key and execution key (each only if this job holds it) and hand the execution key
-- to the next parked job, whose message the caller then publishes and confirms.
-- With A.force == '1' (force), the execution key is released whoever holds it (or if
-- nobody does), and the running record and queue key are left alone.
-- KEYS: running, holders, msg, promoting, qkeys, qk_pending, parked (for this execution key),
--       parked_count (hash queue -> parked jobs)
-- ARGV: job id, execution key or '', queue key or '', grace_ms, force, the worker instance
--       of the attempt that ended or '' (any), how it ended (its history: 'succeeded',
--       'failed' ..., '' for 'ended'), hist_ms (how long a history is kept; 0: none)
-- With on_duplicate="replace", the job waiting for the queue key (qkwait) takes it and is
-- sent on the same way.
-- Returns {removed, ek promotion (job, message, how, or '' x 3), qk promotion (the
-- same)}, shorter when there is none; removed is 1 when
-- this call forgot the job as running (so exactly one caller reports its end). how is
-- 'pushed' when this script pushed the promoted job's kombu payload back to its broker
-- list itself (a message parked with `kombu_payload` and `kombu_list`, on a Redis broker
-- that is this database: fuse.py), to the end BRPOP takes next, so it starts before the
-- jobs queued after it; else 'publish': the caller publishes it, then confirms it
-- (`promoting`).
local function finish()
  local job, ekey, qkey = A.job, A.ek, A.qkey
  local force = A.force == '1'
  local removed = 0
  if not force and A.instance ~= '' then
    -- The end of one attempt, on worker instance A.instance. If the job is recorded as
    -- running elsewhere, this attempt is stale (its worker was stopped past its lease, and
    -- the job was redelivered and admitted again): it releases nothing of the live one.
    local info = stored_object(K.running, job, redis.call('HGET', K.running, job))
    if info and str(info.instance) and info.instance ~= A.instance then return {0} end
  end
  -- The slot of the execution key this job holds (execution_limit: lib.lua), if any.
  local slot = ekey ~= '' and held_slot(K.holders, K.slots, ekey, job) or nil
  if not force then
    if slot and redis.call('HEXISTS', K.running, job) == 0 then
      -- A promoted job that ended before its admission (it expired, it was revoked): its
      -- stored message goes with it.
      redis.call('HDEL', K.msg, job)
      redis.call('ZREM', K.promoting, job)
    end
    removed = redis.call('HDEL', K.running, job)
    release_queue_key(K.qkeys, K.qk_pending, qkey, job, K.qk_until)
  end
  local reply = {removed}
  if not force then
    local waiter, wmessage, whow = hand_queue_key({qkeys = K.qkeys, qkwait = K.qkwait,
      msg = K.msg, parked_count = K.parked_count, promoting = K.promoting}, qkey,
      tonumber(A.grace_ms))
    if waiter then reply = {removed, '', '', '', waiter, wmessage, whow} end
  end
  if ekey == '' then
    return reply
  end
  -- Forced (an operator's release): the next parked job starts even if the key has no
  -- holder any more (`holders` deleted by hand), so no line is stranded.
  if force then
    slot = slot or ekey
  elseif not slot then
    return reply
  end
  local nxt, message, how = pass_slot({
    parked = K.parked, msg = K.msg, parked_count = K.parked_count, holders = K.holders,
    slots = K.slots, promoting = K.promoting, limits = K.limits}, ekey, slot, job,
    tonumber(A.grace_ms))
  if not nxt then return reply end
  reply[2], reply[3], reply[4] = nxt, message, how
  return reply
end
local reply = finish()
local outcome = A.outcome ~= '' and A.outcome or 'ended'
if reply[1] == 1 then
  history(K.running, 'running', A.job, A.hist_ms, outcome, A.instance, '')
elseif A.force == '1' then
  history(K.running, 'running', A.job, A.hist_ms, 'key released by an operator', '', A.ek)
end
if reply[2] and reply[2] ~= '' then
  history(K.running, 'running', reply[2], A.hist_ms, 'promoted', '',
    'execution key ' .. A.ek .. ' handed on by ' .. A.job)
end
if reply[5] and reply[5] ~= '' then
  history(K.running, 'running', reply[5], A.hist_ms, 'promoted', '',
    'queue key ' .. A.qkey .. ' handed on by ' .. A.job)
end
return reply
