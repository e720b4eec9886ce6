-- Functions shared by the scripts: store_base.py prepends this file (after clock.lua) to
-- each one when loading, but for a lean one (`--! LEAN`).

-- Release queue key `qkey` if `job` holds it (compare-and-delete), with its pending
-- deadline. Returns whether it did. A key whose throttle window (`qk_until`, set when a
-- publish with queue_key_until=seconds was accepted) has not ended stays taken until it
-- ends: it becomes pending with the window's end as its deadline.
local function release_queue_key(qkeys, qk_pending, qkey, job, qk_until)
  if type(qkey) ~= 'string' or qkey == '' or redis.call('HGET', qkeys, qkey) ~= job then
    return false
  end
  if qk_until then
    local until_ms = tonumber(redis.call('ZSCORE', qk_until, qkey))
    if until_ms and until_ms > now_ms() then
      redis.call('ZADD', qk_pending, until_ms, qkey)
      return true
    end
    redis.call('ZREM', qk_until, qkey)
  end
  redis.call('HDEL', qkeys, qkey)
  redis.call('ZREM', qk_pending, qkey)
  return true
end

-- Execution-key slots (execution_limit). Slot 1 of key E is E itself (so a key of limit
-- 1 is stored as it always was); slot i > 1 is E .. "\0#" .. i (execution keys may not
-- contain NUL). `holders` maps each held slot to its job; `slots` maps a job holding a
-- slot above 1 to that slot. `limits` holds live limits (set_limit) that override the
-- limit a job was published with.
local function slot_name(ekey, i)
  if i == 1 then return ekey end
  return ekey .. '\0#' .. i
end

local function slot_index(slot)
  local i = string.match(slot, '%z#(%d+)$')
  return tonumber(i) or 1
end

-- The slot `job` holds of `ekey` (its name), or nil: the one `slots` names, else slot 1.
local function held_slot(holders, slots, ekey, job)
  local slot = redis.call('HGET', slots, job)
  if slot and redis.call('HGET', holders, slot) == job then return slot end
  if redis.call('HGET', holders, ekey) == job then return ekey end
  return nil
end

-- Record that `job` holds `slot` of `ekey` (slot 1 needs no record).
local function take_slot(holders, slots, ekey, slot, job)
  redis.call('HSET', holders, slot, job)
  if slot ~= ekey then
    redis.call('HSET', slots, job, slot)
  else
    redis.call('HDEL', slots, job)
  end
end

-- The limit of `ekey`: its live limit, else `given` (the job's own), at least 1.
local function key_limit(limits, ekey, given)
  local live = tonumber(redis.call('HGET', limits, ekey))
  local limit = live or tonumber(given) or 1
  if limit < 1 then limit = 1 end
  return math.floor(limit), live ~= nil
end

-- Poison-proofing. Every key roger owns has one Redis type; a script finding a key of
-- another type (written by hand, by another program, by an older bug) moves it aside
-- before anything else, so no script fails half-way (Lua scripts do not roll back) and
-- no worker stops on it. What was moved is recorded in the `quarantine` hash (field: the
-- key, or key#field for one bad hash value), counted in stats (`quarantined`) and queued
-- in `quarantine_log` for a worker to log once.
local KEY_TYPES = {
  workers = 'zset', running = 'hash', holders = 'hash', slots = 'hash', limits = 'hash', msg = 'hash', promoting = 'zset',
  qkeys = 'hash', qk_pending = 'zset', qk_until = 'zset', retry = 'zset', retry_msg = 'hash',
  buried = 'zset', buried_msg = 'hash', buried_dropped = 'hash', buried_queues = 'set',
  cancelled = 'zset', cancel_reported = 'zset', cancel_reports = 'list', paused = 'hash',
  held_msg = 'hash', held_queues = 'set', parked_count = 'hash', stats = 'hash',
  crash_checks = 'zset', crash_info = 'hash', quarantine = 'hash', quarantine_log = 'list',
  orphan_suspects = 'zset', orphan_suspect_keys = 'hash', sweep = 'hash', schema = 'hash',
  fuse = 'string', rate_due = 'zset', rate_limits = 'hash', qk_prev = 'hash',
  buried_tags = 'hash', buried_facets = 'hash', audit = 'list',
}
local function key_type(key)
  local prefix, name = string.match(key, '^(roger:{[^}]*}:)(.*)$')
  if not name then return nil, nil end
  if string.sub(name, 1, 7) == 'parked:' or string.sub(name, 1, 5) == 'held:'
      or string.sub(name, 1, 5) == 'hist:' then
    return prefix, 'list'
  end
  if string.sub(name, 1, 9) == 'ratewait:' or string.sub(name, 1, 7) == 'qkwait:' then
    return prefix, 'list'
  end
  if string.sub(name, 1, 7) == 'buried:' or string.sub(name, 1, 5) == 'rate:'
      or string.sub(name, 1, 10) == 'buried_by_' then
    return prefix, 'zset'
  end
  return prefix, KEY_TYPES[name]
end

local function preview(value)
  if type(value) ~= 'string' then return '' end
  if #value > 120 then return string.sub(value, 1, 120) .. '...' end
  return value
end

-- Make sure roger's own bookkeeping keys have their types (moved aside unrecorded if not).
local function own_key(prefix, name, wanted, now)
  local key = prefix .. name
  local actual = redis.call('TYPE', key).ok
  if actual ~= 'none' and actual ~= wanted then
    redis.call('RENAME', key, prefix .. 'quarantined:' .. name .. ':' .. now)
  end
  return key
end

local function quarantine_record(prefix, field, record, now)
  local q = own_key(prefix, 'quarantine', 'hash', now)
  local log = own_key(prefix, 'quarantine_log', 'list', now)
  local stats = own_key(prefix, 'stats', 'hash', now)
  record.at = now
  local encoded = cjson.encode(record)
  redis.call('HSET', q, field, encoded)
  redis.call('RPUSH', log, encoded)
  redis.call('LTRIM', log, -100, -1)
  redis.call('HINCRBY', stats, 'quarantined', 1)
end

-- Move a whole key of the wrong type aside.
local function quarantine_key(key, actual, wanted)
  local prefix = key_type(key)
  local now = now_ms()
  local moved = prefix .. 'quarantined:' .. string.sub(key, #prefix + 1) .. ':' .. now
  local sample = ''
  if actual == 'string' then sample = redis.call('GETRANGE', key, 0, 120) end
  redis.call('RENAME', key, moved)
  quarantine_record(prefix, key, {key = key, type = actual, expected = wanted,
    moved_to = moved, preview = preview(sample)}, now)
end

-- Move one unreadable value of a hash aside (its whole value is kept in the record).
local function quarantine_field(hash, field, value, reason)
  local prefix = key_type(hash)
  redis.call('HDEL', hash, field)
  quarantine_record(prefix, hash .. '#' .. field, {key = hash, field = field,
    reason = reason, value = value, preview = preview(value)}, now_ms())
end

-- Record an unreadable entry already taken out of a list or set.
local function quarantine_item(key, value, reason)
  local now = now_ms()
  quarantine_record(key_type(key), key .. '#' .. now, {key = key, reason = reason,
    value = value, preview = preview(value)}, now)
end

-- Check the type of one key roger owns (a key not of roger's is left alone); returns it.
local function guard_key(key)
  local _, wanted = key_type(key)
  if wanted then
    local actual = redis.call('TYPE', key).ok
    if actual ~= 'none' and actual ~= wanted then quarantine_key(key, actual, wanted) end
  end
  return key
end

-- Check the types of all KEYS of the running script (called first by every script).
local function guard_keys()
  for _, key in ipairs(KEYS) do guard_key(key) end
end

-- The buried queue's filter indexes (docs/design.md, "The console's lists"), kept by every
-- script that buries a job or removes a buried one: `buried_tags` (hash job -> task, error
-- type and queue, a JSON array), `buried_by_task:<task>` and `buried_by_error:<type>`
-- (zsets job -> burial time in µs, as `buried`), `buried_facets` (hash `task:<t>` and
-- `error:<e>` -> how many are buried). Dynamic keys: each is type-checked once per call.
local buried_guarded = {}
local function buried_index_key(prefix, name)
  local key = prefix .. name
  if not buried_guarded[key] then buried_guarded[key] = guard_key(key) end
  return key
end

-- Add `delta` to a facet's count; a count that is not a number (written by something
-- else) counts as 0, so the script never fails on it; a count that reaches 0 goes.
local function facet_count(facets, field, delta)
  local n = (tonumber(redis.call('HGET', facets, field)) or 0) + delta
  if n > 0 then redis.call('HSET', facets, field, math.floor(n)) else redis.call('HDEL', facets, field) end
end

local function buried_index_remove(prefix, job)
  local tags = buried_index_key(prefix, 'buried_tags')
  local tag = redis.call('HGET', tags, job)
  if not tag then return nil end
  redis.call('HDEL', tags, job)
  local ok, t = pcall(cjson.decode, tag)  -- [task, error type, queue]
  if not ok or type(t) ~= 'table' or type(t[1]) ~= 'string' or type(t[2]) ~= 'string'
      or type(t[3]) ~= 'string' then
    return nil
  end
  local facets = buried_index_key(prefix, 'buried_facets')
  for _, fv in ipairs({{'task', t[1]}, {'error', t[2]}}) do
    redis.call('ZREM', buried_index_key(prefix, 'buried_by_' .. fv[1] .. ':' .. fv[2]), job)
    facet_count(facets, fv[1] .. ':' .. fv[2], -1)
  end
  return t[3]
end

local function buried_index_add(prefix, job, task, err, queue, at)
  buried_index_remove(prefix, job)
  redis.call('HSET', buried_index_key(prefix, 'buried_tags'), job, cjson.encode({task, err, queue}))
  local facets = buried_index_key(prefix, 'buried_facets')
  for _, fv in ipairs({{'task', task}, {'error', err}}) do
    redis.call('ZADD', buried_index_key(prefix, 'buried_by_' .. fv[1] .. ':' .. fv[2]), at, job)
    facet_count(facets, fv[1] .. ':' .. fv[2], 1)
  end
end

-- A job's history (roger_history_ttl): each transition appends one entry to the list
-- `hist:<job>`, in the script that makes the transition: "<ms>\t<event>\t<worker>\t<detail>",
-- the last 50 kept, the key expiring `hist_ms` after its newest entry (0: history off).
-- `key` is any key of the partition and `name` its name (for the prefix). It never fails
-- its script: a `hist:` key of another type (not roger's) is left alone, the entry lost.
local function history(key, name, job, hist_ms, event, worker, detail)
  local ttl = tonumber(hist_ms)
  if not ttl or ttl <= 0 or type(job) ~= 'string' or job == '' then return end
  local hist = string.sub(key, 1, #key - #name) .. 'hist:' .. job
  local n = redis.pcall('RPUSH', hist, now_ms() .. '\t' .. event .. '\t' .. (worker or '')
    .. '\t' .. string.gsub(detail or '', '[\t\n]', ' '))
  if type(n) ~= 'number' then return end
  if n > 50 then redis.call('LTRIM', hist, -50, -1) end
  redis.call('PEXPIRE', hist, ttl)
end

-- Whether `s` is UTF-8 (JSON must be; cjson does not check, Python's json does).
local function valid_utf8(s)
  if not string.find(s, '[\128-\255]') then return true end
  local i, n = 1, #s
  while i <= n do
    local c = string.byte(s, i)
    local len = 1
    if c >= 0xC2 and c <= 0xDF then len = 2
    elseif c >= 0xE0 and c <= 0xEF then len = 3
    elseif c >= 0xF0 and c <= 0xF4 then len = 4
    elseif c >= 0x80 then return false end
    for j = i + 1, i + len - 1 do
      local cc = string.byte(s, j)
      if not cc or cc < 0x80 or cc > 0xBF then return false end
    end
    i = i + len
  end
  return true
end

-- A JSON object stored in hash `hash` under `field`, or nil (the value is quarantined
-- when it is not a JSON object in UTF-8).
local function stored_object(hash, field, value)
  if not value then return nil end
  local ok, decoded = pcall(cjson.decode, value)
  -- (cjson decodes an array to a table too: one with elements is not an object)
  if ok and type(decoded) == 'table' and #decoded == 0 and valid_utf8(value) then
    return decoded
  end
  quarantine_field(hash, field, value, 'not a JSON object')
  return nil
end

-- t[k1][k2]... when every step is a table, else nil.
local function dig(t, ...)
  for _, k in ipairs({...}) do
    if type(t) ~= 'table' then return nil end
    t = t[k]
  end
  return t
end

local function str(value)
  if type(value) == 'string' then return value end
  return nil
end


-- Take up to `limit` entries of a retry-style sorted set that are due, for publishing:
-- each is re-scored to now + grace, so no other caller takes it before its publisher
-- confirms it (confirm_retries.lua). Entries whose stored job is gone are dropped.
-- Returns {job id, stored json, new score, ...}.
local function take_due(zset, stored_hash, now, grace, limit)
  local due = {}
  for _, job in ipairs(redis.call('ZRANGEBYSCORE', zset, '-inf', now, 'LIMIT', 0, limit)) do
    local stored = redis.call('HGET', stored_hash, job)
    if stored and not stored_object(stored_hash, job, stored) then stored = nil end
    if stored then
      local score = now + grace
      redis.call('ZADD', zset, score, job)
      table.insert(due, job)
      table.insert(due, stored)
      table.insert(due, tostring(score))
    else
      redis.call('ZREM', zset, job)
    end
  end
  return due
end

-- What every admission checks first, for a job that reached a worker (admit.lua, and
-- start.lua for a job admitted in its own process): the deadline a queue key gets for a
-- job with an expiry is removed; then a cancelled job is refused (claiming its on_cancel
-- report once: {'cancelled', 1 or 0}), and a job of a paused queue ({'paused'}).
-- k: {qkeys, qk_pending, cancelled, cancel_reported, stats, paused} key names.
-- Returns nil when the job may go on.
local function arrival_check(job, queue, qkey, now, k)
  if qkey ~= '' and redis.call('HGET', k.qkeys, qkey) == job then
    redis.call('ZREM', k.qk_pending, qkey)
  end
  local cancelled = redis.call('ZSCORE', k.cancelled, job)
  if cancelled and tonumber(cancelled) > now then
    local first = redis.call('ZADD', k.cancel_reported, 'NX', cancelled, job)
    if first == 1 then redis.call('HINCRBY', k.stats, 'cancelled', 1) end
    return {'cancelled', first}
  end
  if queue ~= '' and redis.call('HEXISTS', k.paused, queue) == 1 then
    return {'paused'}
  end
  return nil
end

-- Forget `job` as running if its record is still `record`, the one its attempt wrote
-- (the end of a job without keys, deferred by its process: deferred.py): never a later
-- attempt's record. (A byte comparison: no JSON decoding on the hot path.)
local function forget_ended(running, job, record)
  return redis.call('HGET', running, job) == record and redis.call('HDEL', running, job) == 1
end

-- Record a job as running under `instance` (admit.lua, start.lua). A redelivered job whose
-- earlier attempt was recorded under another instance: if that instance's lease has
-- ended, returns that attempt's record (the caller reports the crash); if it still lasts,
-- queues it in crash_checks for a tick to check again when the lease would end (a
-- duplicate delivery of a job still running elsewhere is then dropped silently).
-- k: {workers, running, crash_checks, crash_info} key names. Returns the record or nil.
local function record_running(job, info_json, instance, now, k)
  local previous = redis.call('HGET', k.running, job)
  local info = stored_object(k.running, job, previous)
  redis.call('HSET', k.running, job, info_json)
  if not info or not str(info.instance) or info.instance == instance then return nil end
  local lease = redis.call('ZSCORE', k.workers, info.instance)
  if lease and tonumber(lease) > now then
    redis.call('ZADD', k.crash_checks, tonumber(lease) + 1000, job)
    redis.call('HSET', k.crash_info, job, previous)
    return nil
  end
  return previous
end

-- The orphaned-key sweep's view (sweep_keys.lua finds suspects, orphan.lua acts on them;
-- both must agree). k: {qk_pending, running, msg, held_msg, buried_msg, promoting}.
-- A queue key's job is accounted for while the key is not yet confirmed (its publisher's
-- grace, or a job's expiry), or the job is running, parked or promoted, held for a
-- pause, or buried.
local function queue_key_accounted(k, qkey, job)
  return redis.call('ZSCORE', k.qk_pending, qkey) or redis.call('HEXISTS', k.running, job) == 1
    or redis.call('HEXISTS', k.msg, job) == 1 or redis.call('HEXISTS', k.held_msg, job) == 1
    or redis.call('HEXISTS', k.buried_msg, job) == 1
end

-- An execution key's holder is accounted for while it runs, or while it is promoted and
-- its publisher has not confirmed the publish (the tick republishes it if need be).
local function holder_accounted(k, job)
  return redis.call('HEXISTS', k.running, job) == 1 or redis.call('ZSCORE', k.promoting, job)
end

-- Send a promoted job on its way: push its kombu payload back to its broker list here
-- ('pushed': a message parked with `kombu_payload` and `kombu_list`, on a Redis broker
-- that is this database: fuse.py), to the end BRPOP takes next, so it starts before the
-- jobs queued after it; else 'publish': the caller publishes it, then confirms it
-- (`promoting`; a tick publishes it again if the caller does not).
local function send_promoted(promoting, job, decoded, grace_ms)
  if type(decoded.kombu_payload) == 'string' and type(decoded.kombu_list) == 'string'
      and decoded.kombu_list ~= '' then
    redis.call('RPUSH', decoded.kombu_list, decoded.kombu_payload)
    return 'pushed'
  end
  redis.call('ZADD', promoting, now_ms() + grace_ms, job)
  return 'publish'
end

-- Hand `slot` of execution key `ekey` to the next parked job that has a message to run
-- (finish.lua, set_limit.lua); or free the slot when none is left. Returns the job, its
-- stored message and how it was sent (send_promoted); or nil.
-- k: {parked, msg, parked_count, holders, slots, promoting} key names.
local function hand_on(k, ekey, slot, grace_ms)
  redis.call('HDEL', k.holders, slot)
  -- A job parked while it still holds a slot of this key (a second delivery, whose
  -- earlier attempt is recorded as running: its end was not recorded) is passed over and
  -- stays first in line until that attempt is finished: it is never handed two slots.
  local passed = {}
  local function done(...)
    for i = #passed, 1, -1 do redis.call('LPUSH', k.parked, passed[i]) end
    return ...
  end
  while true do
    local nxt = redis.call('LPOP', k.parked)
    if not nxt then return done(nil) end
    if held_slot(k.holders, k.slots, ekey, nxt) then
      table.insert(passed, nxt)
    else
      local message = redis.call('HGET', k.msg, nxt)
      local decoded = stored_object(k.msg, nxt, message)
      local queue = str(dig(decoded, 'headers', 'roger', 'q'))
      if queue then redis.call('HINCRBY', k.parked_count, queue, -1) end
      if decoded and type(decoded.body) == 'string' then
        take_slot(k.holders, k.slots, ekey, slot, nxt)
        return done(nxt, message, send_promoted(k.promoting, nxt, decoded, grace_ms))
      elseif decoded then
        quarantine_field(k.msg, nxt, message, 'a parked message without a body')
      end
    end
  end
end

-- `job` gives up `slot` of `ekey` (its attempt ended, or it goes to wait on a rate): the
-- slot retires if the key's live limit was lowered below it, else it is handed on.
-- Returns what hand_on returns. k: as hand_on's, and limits.
local function pass_slot(k, ekey, slot, job, grace_ms)
  redis.call('HDEL', k.slots, job)
  local limit, live = key_limit(k.limits, ekey, 1)
  if live and slot_index(slot) > limit then
    redis.call('HDEL', k.holders, slot)
    return nil
  end
  return hand_on(k, ekey, slot, grace_ms)
end

-- Rates (rate_key, rate). A key R's window `rate:R` is a zset of starts: member
-- "<job>@<ms>" scored by its start time; and of reservations: member "<job>" (a job
-- promoted from R's line `ratewait:R`, on its way to a worker) scored by a deadline in
-- the future, so it counts until it starts (its member is then replaced by a start) or
-- its deadline passes. `rate_due` holds, per key with a line, when the line may move;
-- `rate_limits` the live rates (set_limit) as "starts/window_ms".

-- The rate of key `rk`: its live rate, else the job's own (`n` starts per `w` ms).
local function rate_of(rate_limits, rk, n, w)
  local live = redis.call('HGET', rate_limits, rk)
  if live then
    local ln, lw = string.match(live, '^(%d+)/(%d+)$')
    if ln then return tonumber(ln), tonumber(lw), true end
  end
  return math.max(1, math.floor(tonumber(n) or 1)), math.max(1, math.floor(tonumber(w) or 1000)), false
end

-- Milliseconds until window `rate` has room for one more start (0: it has now), after
-- forgetting the starts older than the window.
local function rate_opening(rate, n, w, now)
  redis.call('ZREMRANGEBYSCORE', rate, '-inf', now - w)
  local count = redis.call('ZCARD', rate)
  if count < n then return 0 end
  local entry = redis.call('ZRANGE', rate, count - n, count - n, 'WITHSCORES')
  return math.max(1, tonumber(entry[2]) + w - now)
end

-- Have key `rk`'s line looked at by `at` (ms) at the latest.
local function rate_due_by(rate_due, rk, at)
  local due = tonumber(redis.call('ZSCORE', rate_due, rk))
  if not due or at < due then redis.call('ZADD', rate_due, at, rk) end
end

-- Take back `job`'s reservation in window `rate` (it did not start after all); the line
-- of `rk` is then looked at at once. Returns whether it had one.
local function drop_reservation(rate, rate_due, rk, job)
  if rk == '' or redis.call('ZREM', rate, job) == 0 then return false end
  rate_due_by(rate_due, rk, now_ms())
  return true
end

-- Take a parked job out of the line it waits in (its execution key's or its rate key's,
-- named by its roger `header`). Returns whether it was in one.
local function leave_lines(prefix, header, job)
  local removed = 0
  if str(header.ek) then removed = redis.call('LREM', prefix .. 'parked:' .. header.ek, 0, job) end
  if str(header.rk) then
    removed = removed + redis.call('LREM', prefix .. 'ratewait:' .. header.rk, 0, job)
  end
  if header.qd == 'replace' and str(header.qk) then
    removed = removed + redis.call('LREM', prefix .. 'qkwait:' .. header.qk, 0, job)
  end
  return removed > 0
end

-- on_duplicate="replace": queue key `qkey` is free (its holder's attempt ended, or it was
-- released by hand) and a job waits for it on `qkwait` (admit.lua): that job takes it and
-- is sent on (send_promoted). Returns the job, its message and how it was sent, or nil.
-- k: {qkeys, qkwait, msg, parked_count, promoting} key names.
local function hand_queue_key(k, qkey, grace_ms)
  if qkey == '' or redis.call('HEXISTS', k.qkeys, qkey) == 1 then return nil end
  while true do
    local nxt = redis.call('LPOP', k.qkwait)
    if not nxt then return nil end
    local message = redis.call('HGET', k.msg, nxt)
    local decoded = stored_object(k.msg, nxt, message)
    if decoded and type(decoded.body) == 'string' then
      local queue = str(dig(decoded, 'headers', 'roger', 'q'))
      if queue then redis.call('HINCRBY', k.parked_count, queue, -1) end
      redis.call('HSET', k.qkeys, qkey, nxt)
      return nxt, message, send_promoted(k.promoting, nxt, decoded, grace_ms)
    end
  end
end

-- Cancel `job` here and now, as cancel.lua does (it never runs; on_cancel is reported
-- once): taken out of `qkwait` and `msg` if it waits there. Returns 1 when this call
-- claims its report (cancel_reports, for a job that waited in Redis; else the caller
-- reports it), else 0. k: {cancelled, cancel_reported, cancel_reports, stats, qkwait,
-- msg, parked_count} key names.
local function cancel_now(k, job, ttl_ms, waiting)
  local expiry = now_ms() + ttl_ms
  redis.call('ZADD', k.cancelled, 'GT', expiry, job)
  local stored = nil
  if waiting then
    redis.call('LREM', k.qkwait, 0, job)
    stored = redis.call('HGET', k.msg, job)
    redis.call('HDEL', k.msg, job)
    local queue = str(dig(stored_object(k.msg, job, stored), 'headers', 'roger', 'q'))
    if queue then redis.call('HINCRBY', k.parked_count, queue, -1) end
  end
  local first = redis.call('ZADD', k.cancel_reported, 'NX', expiry, job)
  if first == 1 then
    redis.call('HINCRBY', k.stats, 'cancelled', 1)
    if waiting then
      redis.call('RPUSH', k.cancel_reports, cjson.encode({job = job, where = 'parked',
        stored = stored or ''}))
    end
  end
  return first
end
