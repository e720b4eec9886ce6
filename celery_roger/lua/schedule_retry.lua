--! KEYS: retry retry_msg cancelled
--! ARGV: job delay_ms entry hist_ms
-- Keep a retry in Redis until it is due (published by a worker's tick, not held as an
-- ETA message in a worker's memory).
-- A cancelled job is not scheduled (returns 0).
-- KEYS: retry (zset job -> due ms), retry_msg (hash job -> entry json), cancelled
-- ARGV: job id, delay ms, entry json
local now = now_ms()
local cancelled = redis.call('ZSCORE', K.cancelled, A.job)
if cancelled and tonumber(cancelled) > now then return 0 end
redis.call('ZADD', K.retry, now + tonumber(A.delay_ms), A.job)
redis.call('HSET', K.retry_msg, A.job, A.entry)
history(K.retry, 'retry', A.job, A.hist_ms, 'retry scheduled', '',
  'due in ' .. (tonumber(A.delay_ms) / 1000) .. ' s')
return 1
