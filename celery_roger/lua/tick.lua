-- Tick: run by every roger worker about once a second. Renews this worker's lease
-- (or ends it, on shutdown), and returns the healing work due anywhere:
--   * jobs recorded as running under a worker whose lease has expired (the caller
--     finishes each, which frees its keys and promotes the next parked job);
--   * promoted jobs whose publisher did not confirm in time (republished by the
--     caller; their deadline is pushed back so only one tick takes each);
--   * retries that are due (published by the caller, which then confirms them with
--     the new score returned here; until then no other tick takes them);
-- and frees queue keys whose publisher died before the broker accepted the job.
-- It also forgets expired cancellations, pops cancellations to report (on_cancel), and
-- returns the paused queues and the queues whose held jobs wait for no pause any more.
-- KEYS: workers, running, promoting, msg, qkeys, qk_pending, retry (zset job -> due ms),
--       retry_msg (hash job -> entry json), cancelled, cancel_reported, cancel_reports,
--       paused, paused_lists, crash_checks, crash_info
-- ARGV: worker instance or '', lease_ms, grace_ms, '1' to deregister the instance
-- Returns {{orphan info json, ...}, {job id, message json, ...}, freed queue keys,
--          {job id, entry json, score, ...}, ms until the next retry is due or -1,
--          {cancel report json, ...}, paused queues, queues with stale held jobs,
--          {earlier attempt's record json, ...} of redelivered jobs whose worker died}.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
if ARGV[1] ~= '' then
  local deadline = now + tonumber(ARGV[2])
  if ARGV[4] == '1' then deadline = 0 end
  redis.call('ZADD', KEYS[1], deadline, ARGV[1])
end

local orphans = {}
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 20)
if #dead > 0 then
  local is_dead, has_jobs = {}, {}
  for _, instance in ipairs(dead) do is_dead[instance] = true end
  local running = redis.call('HGETALL', KEYS[2])
  for i = 1, #running, 2 do
    local ok, info = pcall(cjson.decode, running[i + 1])
    if ok and is_dead[info.instance] then
      has_jobs[info.instance] = true
      table.insert(orphans, running[i + 1])
    end
  end
  for _, instance in ipairs(dead) do
    if not has_jobs[instance] then redis.call('ZREM', KEYS[1], instance) end
  end
end

local republish = {}
local grace = tonumber(ARGV[3])
for _, job in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, 50)) do
  local message = redis.call('HGET', KEYS[4], job)
  if message then
    redis.call('ZADD', KEYS[3], now + grace, job)
    table.insert(republish, job)
    table.insert(republish, message)
  else
    redis.call('ZREM', KEYS[3], job)
  end
end

local freed = redis.call('ZRANGEBYSCORE', KEYS[6], '-inf', now, 'LIMIT', 0, 100)
for _, qkey in ipairs(freed) do
  redis.call('HDEL', KEYS[5], qkey)
  redis.call('ZREM', KEYS[6], qkey)
end
local due = take_due(KEYS[7], KEYS[8], now, grace, 100)
local next_due = -1
local first = redis.call('ZRANGE', KEYS[7], 0, 0, 'WITHSCORES')
if #first > 0 then next_due = math.max(0, tonumber(first[2]) - now) end
redis.call('ZREMRANGEBYSCORE', KEYS[9], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[10], '-inf', now)
local reports = {}
for _ = 1, 50 do
  local report = redis.call('LPOP', KEYS[11])
  if not report then break end
  table.insert(reports, report)
end
local paused = redis.call('HKEYS', KEYS[12])
local stale = {}
local is_paused = {}
for _, queue in ipairs(paused) do is_paused[queue] = true end
for _, queue in ipairs(redis.call('SMEMBERS', KEYS[13])) do
  if not is_paused[queue] then table.insert(stale, queue) end
end
local crashed = {}
for _, job in ipairs(redis.call('ZRANGEBYSCORE', KEYS[14], '-inf', now, 'LIMIT', 0, 50)) do
  local previous = redis.call('HGET', KEYS[15], job)
  redis.call('ZREM', KEYS[14], job)
  redis.call('HDEL', KEYS[15], job)
  if previous then
    local ok, info = pcall(cjson.decode, previous)
    local lease = ok and redis.call('ZSCORE', KEYS[1], info.instance)
    if not lease or tonumber(lease) <= now then table.insert(crashed, previous) end
  end
end
return {orphans, republish, freed, due, next_due, reports, paused, stale, crashed}
