-- Admit: the check a delivered job passes before it may run (worker main process).
-- Renews the worker's lease, then either records the job as running (taking its
-- execution key, or picking up the key handed to it on promotion), or parks it
-- behind the job holding the key.
-- KEYS: workers (zset instance -> lease deadline ms), running (hash job -> info json),
--       held (hash execution key -> job), msg (hash job -> message json),
--       promoting (zset job -> deadline), parked (list of job ids for this execution key)
-- ARGV: job id, worker instance, lease_ms, execution key or '', info json, message json
-- Returns {'run'} or {'parked', position, holder}.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local job, ekey = ARGV[1], ARGV[4]
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])

if ekey ~= '' then
  local holder = redis.call('HGET', KEYS[3], ekey)
  -- The holder is this job only when the key was handed to it on promotion; a second
  -- delivery of a job that is already running waits its turn like any other.
  local mine = holder == job and redis.call('HEXISTS', KEYS[2], job) == 0
  if holder and not mine then
    redis.call('HSET', KEYS[4], job, ARGV[6])
    local position = redis.call('RPUSH', KEYS[6], job)
    return {'parked', position, holder}
  end
  if mine then
    redis.call('HDEL', KEYS[4], job)
    redis.call('ZREM', KEYS[5], job)
  else
    redis.call('HSET', KEYS[3], ekey, job)
  end
end
redis.call('HSET', KEYS[2], job, ARGV[5])
return {'run'}
