--! KEYS: cancelled cancel_reported paused stats workers running crash_checks crash_info qkeys qk_pending qk_until
--! ARGV: job queue info instance qkey qk_release done done_record done_outcome hist_ms
-- Start: the check a job passes in its own process right before its body runs, for
-- what changed after its admission (a cancel, a pause). A job without an execution key
-- is admitted here (info json given): recorded as running under its worker's instance.
-- KEYS: cancelled, cancel_reported, paused, stats, workers, running, crash_checks (zset
--       job -> when to check), crash_info (hash job -> earlier attempt's record), qkeys,
--       qk_pending
-- ARGV: job id, queue, info json or '', worker instance, queue key or '', '1' to release
--       the queue key now; done, done_record: the process's previous job without keys,
--       which ended, and the running record its start wrote (its finish, folded into
--       this call: deferred.py), or ''; done_outcome: how it ended (its history);
--       hist_ms: how long a job's history is kept (0: none)
-- A redelivered job whose earlier attempt was recorded under another, dead instance
-- returns {'run', that record} (the caller reports the crash); if that instance's lease
-- still lasts, a tick checks again when it ends.
-- Returns {'cancelled', 1 if this call claims its on_cancel}, {'paused'} or {'run'}.
local function start()
  local now = now_ms()
  if A.done ~= '' and forget_ended(K.running, A.done, A.done_record) then
    history(K.running, 'running', A.done, A.hist_ms,
      A.done_outcome ~= '' and A.done_outcome or 'ended', A.instance, '')
  end
  local refused = arrival_check(A.job, A.queue, A.qkey, now, {
    qkeys = K.qkeys, qk_pending = K.qk_pending, cancelled = K.cancelled, cancel_reported = K.cancel_reported,
    stats = K.stats, paused = K.paused})
  if refused then return refused end
  if A.qk_release == '1' then  -- queue_key_until="start": the key goes as the job starts
    release_queue_key(K.qkeys, K.qk_pending, A.qkey, A.job, K.qk_until)
  end
  if A.info ~= '' then
    local crashed = record_running(A.job, A.info, A.instance, now, {
      workers = K.workers, running = K.running, crash_checks = K.crash_checks, crash_info = K.crash_info})
    if crashed then return {'run', crashed} end
  end
  return {'run'}
end
local reply = start()
if reply[1] == 'run' then
  history(K.running, 'running', A.job, A.hist_ms, 'started', A.instance, 'queue ' .. A.queue)
elseif reply[1] == 'cancelled' then
  history(K.running, 'running', A.job, A.hist_ms, 'refused: cancelled', A.instance, '')
end
return reply
