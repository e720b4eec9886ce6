--! KEYS: cancelled cancel_reported stats
--! ARGV: job ttl_ms
-- Remember a job as cancelled and claim the right to report it (on_cancel runs once).
-- KEYS: cancelled, cancel_reported, stats
-- ARGV: job id, ttl_ms
-- Returns 1 when this call claims the report, else 0.
local now = now_ms()
local expiry = now + tonumber(A.ttl_ms)
redis.call('ZADD', K.cancelled, 'GT', expiry, A.job)
local first = redis.call('ZADD', K.cancel_reported, 'NX', expiry, A.job)
if first == 1 then redis.call('HINCRBY', K.stats, 'cancelled', 1) end
return first
