--! KEYS: rate ratewait rate_limits rate_due msg parked_count promoting
--! ARGV: rk grace_ms reserve_ms
-- Move rate key A.rk's line: while its window has room, the job at the head of the
-- line gets a reservation in the window (lib.lua: it counts as a start from now on) and
-- is sent to its queue (send_promoted). Run when the window may have opened: by a timer
-- of the worker that parked the job, and by any worker's tick when `rate_due` says so.
-- KEYS: rate (the key's window), ratewait (its line), rate_limits, rate_due, msg,
--       parked_count, promoting
-- ARGV: rate key, grace_ms, reserve_ms (how long a reservation counts if its job never
--       starts)
-- Returns {{job, message, how, ...} promoted, ms until the line may move again or -1}.
local now = now_ms()
local promoted = {}
for _ = 1, 100 do
  local head = redis.call('LINDEX', K.ratewait, 0)
  if not head then
    redis.call('ZREM', K.rate_due, A.rk)
    return {promoted, -1}
  end
  local message = redis.call('HGET', K.msg, head)
  local decoded = stored_object(K.msg, head, message)
  if not decoded or type(decoded.body) ~= 'string' then
    -- Its message is gone (it was cancelled or purged meanwhile): it leaves the line.
    redis.call('LPOP', K.ratewait)
    if decoded then quarantine_field(K.msg, head, message, 'a parked message without a body') end
  else
    local header = dig(decoded, 'headers', 'roger')
    local n, w = rate_of(K.rate_limits, A.rk, dig(header, 'rl', 1), dig(header, 'rl', 2))
    local opening = rate_opening(K.rate, n, w, now)
    if opening > 0 then
      redis.call('ZADD', K.rate_due, now + opening, A.rk)
      return {promoted, opening}
    end
    redis.call('LPOP', K.ratewait)
    local queue = str(dig(header, 'q'))
    if queue then redis.call('HINCRBY', K.parked_count, queue, -1) end
    redis.call('ZADD', K.rate, now + tonumber(A.reserve_ms), head)
    table.insert(promoted, head)
    table.insert(promoted, message)
    table.insert(promoted, send_promoted(K.promoting, head, decoded, tonumber(A.grace_ms)))
  end
end
redis.call('ZADD', K.rate_due, now, A.rk)
return {promoted, 0}
