--! KEYS: hash
--! ARGV: field value reason
-- Move a value that Python could not read aside (see quarantine_field in lib.lua), if it
-- is still the value that was read.
-- KEYS: the hash holding it
-- ARGV: field, the value read, why it is unreadable
-- Returns 1 when it was moved.
if redis.call('HGET', K.hash, A.field) ~= A.value then return 0 end
quarantine_field(K.hash, A.field, A.value, A.reason)
return 1
