-- Keep a retry in Redis until it is due (published by a worker's tick, not held as an
-- ETA message in a worker's memory).
-- A cancelled job is not scheduled (returns 0).
-- KEYS: retry (zset job -> due ms), retry_msg (hash job -> entry json), cancelled
-- ARGV: job id, delay ms, entry json
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local cancelled = redis.call('ZSCORE', KEYS[3], ARGV[1])
if cancelled and tonumber(cancelled) > now then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
return 1
