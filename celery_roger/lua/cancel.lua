--! KEYS: cancelled cancel_reported cancel_reports retry retry_msg msg promoting held_msg qkeys qk_pending qk_until running parked_count stats
--! ARGV: job ttl_ms prefix by hist_ms
-- Cancel a job: remember it (until its TTL), and take it out of every place where it
-- waits in Redis (for its retry, parked on an execution key, held by a paused queue),
-- releasing its queue key. A worker's tick then reports it (on_cancel) exactly once.
-- KEYS: cancelled, cancel_reported, cancel_reports (list), retry, retry_msg, msg,
--       promoting, held_msg, qkeys, qk_pending, running, parked_count, stats
-- ARGV: job id, ttl_ms, key prefix (for parked:<execution key>, ratewait:<rate key> and
--       held:<queue>), who cancels it ('' : not said; its history), hist_ms
-- Returns {running info json or '', where it waited or ''}.
local now = now_ms()
local job, expiry = A.job, now + tonumber(A.ttl_ms)
redis.call('ZADD', K.cancelled, 'GT', expiry, job)
history(K.cancelled, 'cancelled', job, A.hist_ms, 'cancelled', '', A.by ~= '' and ('by ' .. A.by) or '')

local function release_qkey(qkey)
  release_queue_key(K.qkeys, K.qk_pending, qkey, job, K.qk_until)
end
-- The roger header of a stored job (a parked message, a retry entry, a held job).
local function roger_header(decoded)
  -- Its shape is told by `kind` (records.py, StoredJob), or by its fields if written
  -- before 0.2.
  local kind = decoded and decoded.kind
  local header
  if kind == 'message' then
    header = dig(decoded, 'raw', 'headers', 'roger') or dig(decoded, 'headers', 'roger')
  elseif kind == 'entry' then
    header = dig(decoded, 'options', 'headers', 'roger')
  end
  header = header or dig(decoded, 'raw', 'headers', 'roger') or dig(decoded, 'options', 'headers',
    'roger') or dig(decoded, 'headers', 'roger')
  if type(header) == 'table' then return header end
  return {}
end

local where, stored = '', false
stored = redis.call('HGET', K.retry_msg, job)
if stored then
  redis.call('ZREM', K.retry, job)
  redis.call('HDEL', K.retry_msg, job)
  where = 'retry'
else
  stored = redis.call('HGET', K.held_msg, job)
  if stored then
    local decoded = stored_object(K.held_msg, job, stored) or {}
    local header = roger_header(decoded)
    local queue = str(decoded.queue) or str(header.q)
    if queue then
      redis.call('LREM', A.prefix .. 'held:' .. queue, 0, job)
    end
    redis.call('HDEL', K.held_msg, job)
    release_qkey(header.qk)
    where = 'paused'
  else
    stored = redis.call('HGET', K.msg, job)
    if stored and not redis.call('ZSCORE', K.promoting, job) then
      local header = roger_header(stored_object(K.msg, job, stored))
      if leave_lines(A.prefix, header, job) and str(header.q) then
        redis.call('HINCRBY', K.parked_count, header.q, -1)
      end
      redis.call('HDEL', K.msg, job)
      release_qkey(header.qk)
      where = 'parked'
    end
  end
end
if where ~= '' and redis.call('ZADD', K.cancel_reported, 'NX', expiry, job) == 1 then
  redis.call('HINCRBY', K.stats, 'cancelled', 1)
  redis.call('RPUSH', K.cancel_reports, cjson.encode({job = job, where = where, stored = stored}))
end
return {redis.call('HGET', K.running, job) or '', where}
