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
