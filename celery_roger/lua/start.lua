-- Start: the check a job passes in its own process right before its body runs, for
-- what changed after its admission (a cancel, a pause). A job without an execution key
-- is admitted here (info json given): recorded as running under its worker's instance.
-- KEYS: cancelled, cancel_reported, paused, stats, workers, running, crash_checks (zset
--       job -> when to check), crash_info (hash job -> earlier attempt's record), qkeys,
--       qk_pending
-- ARGV: job id, queue, info json or '', worker instance, queue key or ''
-- A redelivered job whose earlier attempt was recorded under another, dead instance
-- returns {'run', that record} (the caller reports the crash); if that instance's lease
-- still lasts, a tick checks again when it ends.
-- Returns {'cancelled', 1 if this call claims its on_cancel}, {'paused'} or {'run'}.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local refused = arrival_check(ARGV[1], ARGV[2], ARGV[5], now, {
  qkeys = KEYS[9], qk_pending = KEYS[10], cancelled = KEYS[1], cancel_reported = KEYS[2],
  stats = KEYS[4], paused = KEYS[3]})
if refused then return refused end
if ARGV[3] ~= '' then
  local crashed = record_running(ARGV[1], ARGV[3], ARGV[4], now, {
    workers = KEYS[5], running = KEYS[6], crash_checks = KEYS[7], crash_info = KEYS[8]})
  if crashed then return {'run', crashed} end
end
return {'run'}
