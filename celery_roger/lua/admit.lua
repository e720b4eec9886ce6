--! KEYS: workers running holders slots limits msg promoting parked cancelled cancel_reported paused parked_count stats qkeys qk_pending qk_until crash_checks crash_info
--! ARGV: job instance ek info message queue qkey qk_release limit
-- Admit: the check a delivered job passes before it may run (worker main process).
-- Checks the worker's lease, then either records the job as running (taking its
-- execution key, or picking up the key handed to it on promotion), or parks it
-- behind the job holding the key.
-- KEYS: workers (zset instance -> lease deadline ms), running (hash job -> info json),
--       holders (hash execution key -> job), msg (hash job -> message json),
--       promoting (zset job -> deadline), parked (list of job ids for this execution key),
--       cancelled (zset job -> expiry), cancel_reported (zset job -> expiry),
--       paused (hash queue -> info json), parked_count (hash queue -> parked jobs), stats,
--       qkeys, qk_pending, crash_checks, crash_info
-- ARGV: job id, worker instance, (unused), execution key or '', info json, message json,
--       queue, queue key or ''
-- A cancelled job is refused first ({'cancelled', 1 if this call claims its on_cancel}),
-- then a job of a paused queue ({'paused'}: the caller stores it for resume).
-- Returns {'nolease'} (the caller admits it later), {'run'}, {'run', earlier attempt's
-- record json} for a redelivered job whose earlier attempt's worker is dead (see
-- record_running in lib.lua), or {'parked', position, holder}.
local now = now_ms()
local job, ekey = A.job, A.ek
-- Only under a live lease: a worker whose lease ran out (stopped, stalled) may have had
-- its jobs taken for dead; it admits nothing until its lease thread has registered again.
local lease = redis.call('ZSCORE', K.workers, A.instance)
if not lease or tonumber(lease) <= now then return {'nolease'} end

local refused = arrival_check(job, A.queue, A.qkey, now, {
  qkeys = K.qkeys, qk_pending = K.qk_pending, cancelled = K.cancelled, cancel_reported = K.cancel_reported,
  stats = K.stats, paused = K.paused})
if refused then return refused end

if ekey ~= '' then
  -- The job holds a slot only when one was handed to it on promotion; a second delivery
  -- of a job that is already running waits its turn like any other.
  local own = held_slot(K.holders, K.slots, ekey, job)
  local running = redis.call('HEXISTS', K.running, job) == 1
  if own and not running then
    redis.call('HDEL', K.msg, job)
    redis.call('ZREM', K.promoting, job)
  else
    -- A free slot within the key's limit, unless jobs are parked (no overtaking).
    local free = nil
    if not own and redis.call('LLEN', K.parked) == 0 then
      local limit = key_limit(K.limits, ekey, A.limit)
      for i = 1, limit do
        local slot = slot_name(ekey, i)
        if not redis.call('HGET', K.holders, slot) then free = slot break end
      end
    end
    if not free then
      redis.call('HSET', K.msg, job, A.message)
      local position = redis.call('RPUSH', K.parked, job)
      redis.call('HINCRBY', K.parked_count, A.queue, 1)
      return {'parked', position, redis.call('HGET', K.holders, ekey) or ''}
    end
    redis.call('HSET', K.holders, free, job)
    if free ~= ekey then redis.call('HSET', K.slots, job, free) end
  end
end
if A.qk_release == '1' then  -- queue_key_until="start": the key goes as the job starts
  release_queue_key(K.qkeys, K.qk_pending, A.qkey, job, K.qk_until)
end
local crashed = record_running(job, A.info, A.instance, now, {
  workers = K.workers, running = K.running, crash_checks = K.crash_checks, crash_info = K.crash_info})
if crashed then return {'run', crashed} end
return {'run'}
