--! KEYS: buried_msg qkeys qk_pending
--! ARGV: job grace_ms
-- Requeue a buried job, step 1: read its entry and take its queue key (pending, like a
-- publish) unless another job holds the key. The entry stays buried until step 2.
-- KEYS: buried_msg, qkeys, qk_pending
-- ARGV: job id, grace_ms
-- Returns {'missing'}, {'taken', holder} or {'ok', entry json}.
local entry = redis.call('HGET', K.buried_msg, A.job)
local decoded = stored_object(K.buried_msg, A.job, entry)
if not decoded then return {'missing'} end
local qkey = str(decoded.queue_key)
if qkey and qkey ~= '' then
  local now = now_ms()
  local holder = redis.call('HGET', K.qkeys, qkey)
  if holder and holder ~= A.job then
    local deadline = redis.call('ZSCORE', K.qk_pending, qkey)
    if not deadline or tonumber(deadline) > now then
      return {'taken', holder}
    end
  end
  redis.call('HSET', K.qkeys, qkey, A.job)
  redis.call('ZADD', K.qk_pending, now + tonumber(A.grace_ms), qkey)
end
return {'ok', entry}
