-- Tick: run by every roger worker about once a second. Renews this worker's lease
-- (or ends it, on shutdown), and returns the healing work due anywhere:
--   * jobs recorded as running under a worker whose lease has expired (the caller
--     finishes each, which frees its keys and promotes the next parked job);
--   * promoted jobs whose publisher did not confirm in time (republished by the
--     caller; their deadline is pushed back so only one tick takes each);
-- and frees queue keys whose publisher died before the broker accepted the job.
-- KEYS: workers, running, promoting, msg, qkeys, qk_pending
-- ARGV: worker instance or '', lease_ms, grace_ms, '1' to deregister the instance
-- Returns {{orphan info json, ...}, {job id, message json, ...}, freed queue keys}.
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
return {orphans, republish, freed}
