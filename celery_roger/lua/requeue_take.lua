-- Requeue a buried job, step 1: read its entry and take its queue key (pending, like a
-- publish) unless another job holds the key. The entry stays buried until step 2.
-- KEYS: buried_msg, qkeys, qk_pending
-- ARGV: job id, grace_ms
-- Returns {'missing'}, {'held', holder} or {'ok', entry json}.
local entry = redis.call('HGET', KEYS[1], ARGV[1])
if not entry then return {'missing'} end
local ok, decoded = pcall(cjson.decode, entry)
local qkey = ok and decoded.queue_key
if type(qkey) == 'string' and qkey ~= '' then
  local t = redis.call('TIME')
  local now = t[1] * 1000 + math.floor(t[2] / 1000)
  local holder = redis.call('HGET', KEYS[2], qkey)
  if holder and holder ~= ARGV[1] then
    local deadline = redis.call('ZSCORE', KEYS[3], qkey)
    if not deadline or tonumber(deadline) > now then
      return {'held', holder}
    end
  end
  redis.call('HSET', KEYS[2], qkey, ARGV[1])
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[2]), qkey)
end
return {'ok', entry}
