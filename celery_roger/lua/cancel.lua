-- Cancel a job: remember it (until its TTL), and take it out of every place where it
-- waits in Redis (for its retry, parked on an execution key, held by a paused queue),
-- releasing its queue key. A worker's tick then reports it (on_cancel) exactly once.
-- KEYS: cancelled, cancel_reported, cancel_reports (list), retry, retry_msg, msg,
--       promoting, paused_msg, qkeys, qk_pending, running, parked_count, stats
-- ARGV: job id, ttl_ms, key prefix (for parked:<execution key> and pausedjobs:<queue>)
-- Returns {running info json or '', where it waited or ''}.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local job, expiry = ARGV[1], now + tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], 'GT', expiry, job)

local function release_qkey(qkey)
  if type(qkey) == 'string' and qkey ~= '' and redis.call('HGET', KEYS[9], qkey) == job then
    redis.call('HDEL', KEYS[9], qkey)
    redis.call('ZREM', KEYS[10], qkey)
  end
end
local function roger_header(stored)
  local ok, decoded = pcall(cjson.decode, stored)
  if not ok then return {} end
  local headers = decoded.raw and decoded.raw.headers
    or (decoded.options and decoded.options.headers) or decoded.headers or {}
  return headers.roger or {}
end

local where, stored = '', false
stored = redis.call('HGET', KEYS[5], job)
if stored then
  redis.call('ZREM', KEYS[4], job)
  redis.call('HDEL', KEYS[5], job)
  where = 'retry'
else
  stored = redis.call('HGET', KEYS[8], job)
  if stored then
    local header = roger_header(stored)
    local ok, decoded = pcall(cjson.decode, stored)
    local queue = (ok and decoded.queue) or header.q
    if type(queue) == 'string' then
      redis.call('LREM', ARGV[3] .. 'pausedjobs:' .. queue, 0, job)
    end
    redis.call('HDEL', KEYS[8], job)
    release_qkey(header.qk)
    where = 'paused'
  else
    stored = redis.call('HGET', KEYS[6], job)
    if stored and not redis.call('ZSCORE', KEYS[7], job) then
      local header = roger_header(stored)
      if header.ek and redis.call('LREM', ARGV[3] .. 'parked:' .. header.ek, 0, job) > 0
          and type(header.q) == 'string' then
        redis.call('HINCRBY', KEYS[12], header.q, -1)
      end
      redis.call('HDEL', KEYS[6], job)
      release_qkey(header.qk)
      where = 'parked'
    end
  end
end
if where ~= '' and redis.call('ZADD', KEYS[2], 'NX', expiry, job) == 1 then
  redis.call('HINCRBY', KEYS[13], 'cancelled', 1)
  redis.call('RPUSH', KEYS[3], cjson.encode({job = job, where = where, stored = stored}))
end
return {redis.call('HGET', KEYS[11], job) or '', where}
