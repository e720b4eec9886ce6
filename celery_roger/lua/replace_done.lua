--! KEYS: qkeys qk_pending qk_prev
--! ARGV: qkey job sent previous
-- Publish with on_duplicate="replace", step 2, for a job that took its key over from
-- A.previous (replace_take.lua: 'replacing'): A.sent == '1' (the broker has it) forgets
-- the replaced holder (the caller then cancels it); '0' (the send failed) gives the key
-- back to it. Either only if this job still holds the key.
-- KEYS: qkeys, qk_pending, qk_prev
-- ARGV: queue key, job id, '1' or '0', the replaced holder
-- Returns 1 when this job still held the key, else 0.
if redis.call('HGET', K.qkeys, A.qkey) ~= A.job then return 0 end
redis.call('HDEL', K.qk_prev, A.qkey)
if A.sent == '0' then
  redis.call('HSET', K.qkeys, A.qkey, A.previous)
  redis.call('ZREM', K.qk_pending, A.qkey)
end
return 1
