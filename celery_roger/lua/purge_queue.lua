--! KEYS: held_queue held_msg held_queues retry retry_msg msg promoting qkeys qk_pending qk_until parked_count
--! ARGV: queue prefix parked retrying
-- Purge the jobs roger keeps for one queue (`Roger(app).purge`; the caller drains the
-- broker's copy of the queue itself): the jobs held for it while paused, and the
-- candidates the caller found by scanning `msg` (parked) and `retry_msg` (waiting
-- retries), each checked again here to still be of this queue. Each removed job's queue
-- key is released (never a key another job holds); a parked job leaves its execution
-- key's line. A promoted job (in `promoting`) is left alone: it holds its execution key
-- and its message is in the broker, or on its way there.
-- KEYS: held:<queue>, held_msg, held_queues, retry, retry_msg, msg, promoting, qkeys,
--       qk_pending, parked_count
-- ARGV: queue, key prefix (for parked:<execution key>), JSON arrays of job ids: parked
--       candidates, retry candidates
-- Returns {parked, held, retrying}: how many were removed from each place.
local queue = A.queue

-- The roger header of a stored job (a parked message, a retry entry, a held job), told
-- by its `kind` (records.py, StoredJob) or, if written before 0.2, by its fields.
local function roger_header(decoded)
  local header = dig(decoded, 'raw', 'headers', 'roger') or dig(decoded, 'options', 'headers',
    'roger') or dig(decoded, 'headers', 'roger')
  if type(header) == 'table' then return header end
  return {}
end
local function ids(json)
  local ok, decoded = pcall(cjson.decode, json)
  if ok and type(decoded) == 'table' then return decoded end
  return {}
end

local held = 0
for _, job in ipairs(redis.call('LRANGE', K.held_queue, 0, -1)) do
  local stored = redis.call('HGET', K.held_msg, job)
  if stored then
    local decoded = stored_object(K.held_msg, job, stored)
    release_queue_key(K.qkeys, K.qk_pending, str(roger_header(decoded).qk), job, K.qk_until)
    redis.call('HDEL', K.held_msg, job)
    held = held + 1
  end
end
redis.call('DEL', K.held_queue)
redis.call('SREM', K.held_queues, queue)

local retrying = 0
for _, job in ipairs(ids(A.retrying)) do
  local stored = type(job) == 'string' and redis.call('HGET', K.retry_msg, job)
  local header = stored and roger_header(stored_object(K.retry_msg, job, stored))
  if header and header.q == queue then
    redis.call('ZREM', K.retry, job)
    redis.call('HDEL', K.retry_msg, job)
    release_queue_key(K.qkeys, K.qk_pending, str(header.qk), job, K.qk_until)
    retrying = retrying + 1
  end
end

local parked = 0
for _, job in ipairs(ids(A.parked)) do
  local stored = type(job) == 'string' and not redis.call('ZSCORE', K.promoting, job)
    and redis.call('HGET', K.msg, job)
  local header = stored and roger_header(stored_object(K.msg, job, stored))
  if header and header.q == queue then
    -- Only a job still in its line: a promoted one (its message kept in msg until it is
    -- admitted) is in the broker or a worker's hands already, and keeps its keys.
    if leave_lines(A.prefix, header, job) then
      redis.call('HINCRBY', K.parked_count, queue, -1)
      parked = parked + 1
      redis.call('HDEL', K.msg, job)
      release_queue_key(K.qkeys, K.qk_pending, str(header.qk), job, K.qk_until)
    end
  end
end
return {parked, held, retrying}
