--! KEYS: workers running promoting msg qkeys qk_pending qk_until retry retry_msg cancelled cancel_reported cancel_reports paused held_queues crash_checks crash_info quarantine_log rate_due qk_prev
--! ARGV: grace_ms
-- Tick: run by every roger worker's healer about once a second. Returns the healing work
-- due anywhere (the lease itself is renewed by renew.lua, on its own thread):
--   * jobs recorded as running under a worker whose lease has expired (the caller
--     finishes each, which frees its keys and promotes the next parked job);
--   * promoted jobs whose publisher did not confirm in time (republished by the
--     caller; their deadline is pushed back so only one tick takes each);
--   * retries that are due (published by the caller, which then confirms them with
--     the new score returned here; until then no other tick takes them);
-- and frees queue keys whose publisher died before the broker accepted the job.
-- It also forgets expired cancellations, pops cancellations to report (on_cancel), and
-- returns the paused queues and the queues whose held jobs wait for no pause any more,
-- and the quarantine records to log.
-- KEYS: workers, running, promoting, msg, qkeys, qk_pending, retry (zset job -> due ms),
--       retry_msg (hash job -> entry json), cancelled, cancel_reported, cancel_reports,
--       paused, held_queues, crash_checks, crash_info, quarantine_log
-- ARGV: grace_ms
-- Returns {{orphan info json, ...}, {job id, message json, ...}, freed queue keys,
--          {job id, entry json, score, ...}, ms until the next retry is due or -1,
--          {cancel report json, ...}, paused queues, queues with stale held jobs,
--          {earlier attempt's record json, ...} of redelivered jobs whose worker died,
--          {quarantine record json, ...}, rate keys whose line may move (the caller
--          runs rate_wake.lua for each; each is put off a second so one tick takes it)}.
local now = now_ms()

local orphans = {}
local dead = redis.call('ZRANGEBYSCORE', K.workers, '-inf', now, 'LIMIT', 0, 20)
if #dead > 0 then
  local is_dead, has_jobs = {}, {}
  for _, instance in ipairs(dead) do is_dead[instance] = true end
  local running = redis.call('HGETALL', K.running)
  for i = 1, #running, 2 do
    local info = stored_object(K.running, running[i], running[i + 1])
    if info and str(info.instance) and is_dead[info.instance] then
      has_jobs[info.instance] = true
      table.insert(orphans, running[i + 1])
    end
  end
  for _, instance in ipairs(dead) do
    if not has_jobs[instance] then redis.call('ZREM', K.workers, instance) end
  end
end

local republish = {}
local grace = tonumber(A.grace_ms)
for _, job in ipairs(redis.call('ZRANGEBYSCORE', K.promoting, '-inf', now, 'LIMIT', 0, 50)) do
  local message = redis.call('HGET', K.msg, job)
  if message and type(dig(stored_object(K.msg, job, message), 'body')) ~= 'string' then
    message = nil
  end
  if message then
    redis.call('ZADD', K.promoting, now + grace, job)
    table.insert(republish, job)
    table.insert(republish, message)
  else
    redis.call('ZREM', K.promoting, job)
  end
end

local freed = redis.call('ZRANGEBYSCORE', K.qk_pending, '-inf', now, 'LIMIT', 0, 100)
for _, qkey in ipairs(freed) do
  -- (a replacing publish whose publisher died: the job it displaced has the key back)
  local previous = redis.call('HGET', K.qk_prev, qkey)
  if previous then
    redis.call('HSET', K.qkeys, qkey, previous)
    redis.call('HDEL', K.qk_prev, qkey)
  else
    redis.call('HDEL', K.qkeys, qkey)
  end
  redis.call('ZREM', K.qk_pending, qkey)
  redis.call('ZREM', K.qk_until, qkey)
end
local due = take_due(K.retry, K.retry_msg, now, grace, 100)
local next_due = -1
local first = redis.call('ZRANGE', K.retry, 0, 0, 'WITHSCORES')
if #first > 0 then next_due = math.max(0, tonumber(first[2]) - now) end
redis.call('ZREMRANGEBYSCORE', K.cancelled, '-inf', now)
redis.call('ZREMRANGEBYSCORE', K.cancel_reported, '-inf', now)
local reports = {}
for _ = 1, 50 do
  local report = redis.call('LPOP', K.cancel_reports)
  if not report then break end
  local ok, decoded = pcall(cjson.decode, report)
  if ok and type(decoded) == 'table' and str(decoded.job) then
    table.insert(reports, report)
  else
    quarantine_item(K.cancel_reports, report, 'not a cancel report')
  end
end
local paused = redis.call('HKEYS', K.paused)
local stale = {}
local is_paused = {}
for _, queue in ipairs(paused) do is_paused[queue] = true end
for _, queue in ipairs(redis.call('SMEMBERS', K.held_queues)) do
  if not is_paused[queue] then table.insert(stale, queue) end
end
local crashed = {}
for _, job in ipairs(redis.call('ZRANGEBYSCORE', K.crash_checks, '-inf', now, 'LIMIT', 0, 50)) do
  local previous = redis.call('HGET', K.crash_info, job)
  redis.call('ZREM', K.crash_checks, job)
  redis.call('HDEL', K.crash_info, job)
  local info = stored_object(K.crash_info, job, previous)
  if info and str(info.instance) then
    local lease = redis.call('ZSCORE', K.workers, info.instance)
    if not lease or tonumber(lease) <= now then table.insert(crashed, previous) end
  end
end
local quarantined = {}
for _ = 1, 20 do
  local entry = redis.call('LPOP', K.quarantine_log)
  if not entry then break end
  table.insert(quarantined, entry)
end
local rates = redis.call('ZRANGEBYSCORE', K.rate_due, '-inf', now, 'LIMIT', 0, 20)
for _, rk in ipairs(rates) do redis.call('ZADD', K.rate_due, now + 1000, rk) end
return {orphans, republish, freed, due, next_due, reports, paused, stale, crashed, quarantined,
  rates}
