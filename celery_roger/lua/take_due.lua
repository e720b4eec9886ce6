--! KEYS: retry retry_msg
--! ARGV: grace_ms limit
-- Take the retries (and resumed jobs) that are due, for publishing, as the tick does;
-- the caller confirms each with the score returned (confirm_retries.lua).
-- KEYS: retry, retry_msg
-- ARGV: grace_ms, max count
-- Returns {job id, stored json, score, ...}.
local now = now_ms()
return take_due(K.retry, K.retry_msg, now, tonumber(A.grace_ms), tonumber(A.limit))
