-- Functions shared by the scripts: store.py prepends this file to each one when loading.

-- Take up to `limit` entries of a retry-style sorted set that are due, for publishing:
-- each is re-scored to now + grace, so no other caller takes it before its publisher
-- confirms it (confirm_retries.lua). Entries whose stored job is gone are dropped.
-- Returns {job id, stored json, new score, ...}.
local function take_due(zset, stored_hash, now, grace, limit)
  local due = {}
  for _, job in ipairs(redis.call('ZRANGEBYSCORE', zset, '-inf', now, 'LIMIT', 0, limit)) do
    local stored = redis.call('HGET', stored_hash, job)
    if stored then
      local score = now + grace
      redis.call('ZADD', zset, score, job)
      table.insert(due, job)
      table.insert(due, stored)
      table.insert(due, tostring(score))
    else
      redis.call('ZREM', zset, job)
    end
  end
  return due
end

-- What every admission checks first, for a job that reached a worker (admit.lua, and
-- start.lua for a job admitted in its own process): the deadline a queue key gets for a
-- job with an expiry is removed; then a cancelled job is refused (claiming its on_cancel
-- report once: {'cancelled', 1 or 0}), and a job of a paused queue ({'paused'}).
-- k: {qkeys, qk_pending, cancelled, cancel_reported, stats, paused} key names.
-- Returns nil when the job may go on.
local function arrival_check(job, queue, qkey, now, k)
  if qkey ~= '' and redis.call('HGET', k.qkeys, qkey) == job then
    redis.call('ZREM', k.qk_pending, qkey)
  end
  local cancelled = redis.call('ZSCORE', k.cancelled, job)
  if cancelled and tonumber(cancelled) > now then
    local first = redis.call('ZADD', k.cancel_reported, 'NX', cancelled, job)
    if first == 1 then redis.call('HINCRBY', k.stats, 'cancelled', 1) end
    return {'cancelled', first}
  end
  if queue ~= '' and redis.call('HEXISTS', k.paused, queue) == 1 then
    return {'paused'}
  end
  return nil
end

-- Record a job as running under `instance` (admit.lua, start.lua). A redelivered job whose
-- earlier attempt was recorded under another instance: if that instance's lease has
-- ended, returns that attempt's record (the caller reports the crash); if it still lasts,
-- queues it in crash_checks for a tick to check again when the lease would end (a
-- duplicate delivery of a job still running elsewhere is then dropped silently).
-- k: {workers, running, crash_checks, crash_info} key names. Returns the record or nil.
local function record_running(job, info_json, instance, now, k)
  local previous = redis.call('HGET', k.running, job)
  redis.call('HSET', k.running, job, info_json)
  if not previous then return nil end
  local ok, info = pcall(cjson.decode, previous)
  if not ok or info.instance == instance then return nil end
  local lease = redis.call('ZSCORE', k.workers, info.instance)
  if lease and tonumber(lease) > now then
    redis.call('ZADD', k.crash_checks, tonumber(lease) + 1000, job)
    redis.call('HSET', k.crash_info, job, previous)
    return nil
  end
  return previous
end
