-- Remember a job as cancelled and claim the right to report it (on_cancel runs once).
-- KEYS: cancelled, cancel_reported, stats
-- ARGV: job id, ttl_ms
-- Returns 1 when this call claims the report, else 0.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local expiry = now + tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], 'GT', expiry, ARGV[1])
local first = redis.call('ZADD', KEYS[2], 'NX', expiry, ARGV[1])
if first == 1 then redis.call('HINCRBY', KEYS[3], 'cancelled', 1) end
return first
