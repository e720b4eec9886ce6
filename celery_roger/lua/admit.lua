-- Admit: the check a delivered job passes before it may run (worker main process).
-- Renews the worker's lease, then either records the job as running (taking its
-- execution key, or picking up the key handed to it on promotion), or parks it
-- behind the job holding the key.
-- KEYS: workers (zset instance -> lease deadline ms), running (hash job -> info json),
--       held (hash execution key -> job), msg (hash job -> message json),
--       promoting (zset job -> deadline), parked (list of job ids for this execution key),
--       cancelled (zset job -> expiry), cancel_reported (zset job -> expiry),
--       paused (hash queue -> info json), parked_count (hash queue -> parked jobs), stats,
--       qkeys, qk_pending, crash_checks, crash_info
-- ARGV: job id, worker instance, lease_ms, execution key or '', info json, message json,
--       queue, queue key or ''
-- A cancelled job is refused first ({'cancelled', 1 if this call claims its on_cancel}),
-- then a job of a paused queue ({'paused'}: the caller stores it for resume).
-- Returns {'run'}, {'run', earlier attempt's record json} for a redelivered job whose
-- earlier attempt's worker is dead (see record_running in lib.lua), or
-- {'parked', position, holder}.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local job, ekey = ARGV[1], ARGV[4]
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])

local refused = arrival_check(job, ARGV[7], ARGV[8], now, {
  qkeys = KEYS[12], qk_pending = KEYS[13], cancelled = KEYS[7], cancel_reported = KEYS[8],
  stats = KEYS[11], paused = KEYS[9]})
if refused then return refused end

if ekey ~= '' then
  local holder = redis.call('HGET', KEYS[3], ekey)
  -- The holder is this job only when the key was handed to it on promotion; a second
  -- delivery of a job that is already running waits its turn like any other.
  local mine = holder == job and redis.call('HEXISTS', KEYS[2], job) == 0
  if holder and not mine then
    redis.call('HSET', KEYS[4], job, ARGV[6])
    local position = redis.call('RPUSH', KEYS[6], job)
    redis.call('HINCRBY', KEYS[10], ARGV[7], 1)
    return {'parked', position, holder}
  end
  if mine then
    redis.call('HDEL', KEYS[4], job)
    redis.call('ZREM', KEYS[5], job)
  else
    redis.call('HSET', KEYS[3], ekey, job)
  end
end
local crashed = record_running(job, ARGV[5], ARGV[2], now, {
  workers = KEYS[1], running = KEYS[2], crash_checks = KEYS[14], crash_info = KEYS[15]})
if crashed then return {'run', crashed} end
return {'run'}
