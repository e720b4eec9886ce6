-- Finish: a job's attempt ended (any outcome). Forget it as running, release its queue
-- key and execution key (each only if this job holds it) and hand the execution key
-- to the next parked job, whose message the caller then publishes and confirms.
-- With ARGV[5] == '1' (force), the execution key is released whoever holds it, and
-- the running record and queue key are left alone.
-- KEYS: running, held, msg, promoting, qkeys, qk_pending, parked (for this execution key),
--       parked_count (hash queue -> parked jobs)
-- ARGV: job id, execution key or '', queue key or '', grace_ms, force
-- Returns {removed} or {removed, next job id, its message json}; removed is 1 when
-- this call forgot the job as running (so exactly one caller reports its end).
local job, ekey, qkey = ARGV[1], ARGV[2], ARGV[3]
local force = ARGV[5] == '1'
local removed = 0
if not force then
  removed = redis.call('HDEL', KEYS[1], job)
  if qkey ~= '' and redis.call('HGET', KEYS[5], qkey) == job then
    redis.call('HDEL', KEYS[5], qkey)
    redis.call('ZREM', KEYS[6], qkey)
  end
end
if ekey == '' then
  return {removed}
end
local holder = redis.call('HGET', KEYS[2], ekey)
if not holder or (holder ~= job and not force) then
  return {removed}
end
while true do
  local nxt = redis.call('LPOP', KEYS[7])
  if not nxt then
    redis.call('HDEL', KEYS[2], ekey)
    return {removed}
  end
  local message = redis.call('HGET', KEYS[3], nxt)
  if message then
    local ok, decoded = pcall(cjson.decode, message)
    local header = ok and decoded.headers and decoded.headers.roger
    if type(header) == 'table' and type(header.q) == 'string' then
      redis.call('HINCRBY', KEYS[8], header.q, -1)
    end
    local t = redis.call('TIME')
    local now = t[1] * 1000 + math.floor(t[2] / 1000)
    redis.call('HSET', KEYS[2], ekey, nxt)
    redis.call('ZADD', KEYS[4], now + tonumber(ARGV[4]), nxt)
    return {removed, nxt, message}
  end
end
