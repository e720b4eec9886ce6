-- Publish with a queue key, step 2: the broker accepted the message, so the key is
-- held until the job's attempt ends (no deadline any more).
-- KEYS: qkeys, qk_pending
-- ARGV: queue key, job id
-- Returns 1 when the job still held the key, 0 when it had lost it.
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then
  return 0
end
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
