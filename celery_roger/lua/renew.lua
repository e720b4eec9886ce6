--! KEYS: workers schema
--! ARGV: instance lease_ms deregister registered version
-- Renew a worker's lease (the one thing the lease thread does), or end it (deregister).
-- A lease that has already run out is not renewed: other workers may have taken its jobs
-- for dead and handed their execution keys on (a worker stopped with SIGSTOP, then
-- continued), so its worker must stop its roger jobs and register again.
-- Registering (A.registered ~= '1') also marks the partition with this version's key names
-- (migrate.lua).
-- KEYS: workers (zset instance -> lease deadline ms), schema (hash: version)
-- ARGV: worker instance, lease_ms, '1' to deregister, '1' if registered before, schema
--       version
-- Returns 1, or 0 when the lease had run out.
local now = now_ms()
if A.deregister == '1' then
  redis.call('ZADD', K.workers, 0, A.instance)
  return 1
end
if A.registered == '1' then
  local deadline = redis.call('ZSCORE', K.workers, A.instance)
  if not deadline or tonumber(deadline) <= now then return 0 end
else
  redis.call('HSET', K.schema, 'version', A.version)
end
redis.call('ZADD', K.workers, now + tonumber(A.lease_ms), A.instance)
return 1
