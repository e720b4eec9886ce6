-- Take the retries (and resumed jobs) that are due, for publishing; the caller
-- confirms each with the score returned (confirm_retries.lua). Same as the tick's part.
-- KEYS: retry, retry_msg
-- ARGV: grace_ms, max count
-- Returns {job id, stored json, score, ...}.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local due = {}
for _, job in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0,
                                tonumber(ARGV[2]))) do
  local stored = redis.call('HGET', KEYS[2], job)
  if stored then
    local score = now + tonumber(ARGV[1])
    redis.call('ZADD', KEYS[1], score, job)
    table.insert(due, job)
    table.insert(due, stored)
    table.insert(due, tostring(score))
  else
    redis.call('ZREM', KEYS[1], job)
  end
end
return due
