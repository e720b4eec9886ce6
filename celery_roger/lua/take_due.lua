-- Take the retries (and resumed jobs) that are due, for publishing, as the tick does;
-- the caller confirms each with the score returned (confirm_retries.lua).
-- KEYS: retry, retry_msg
-- ARGV: grace_ms, max count
-- Returns {job id, stored json, score, ...}.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
return take_due(KEYS[1], KEYS[2], now, tonumber(ARGV[1]), tonumber(ARGV[2]))
