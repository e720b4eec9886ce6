--! KEYS: workers running holders slots limits msg promoting parked cancelled cancel_reported paused parked_count stats qkeys qk_pending qk_until crash_checks crash_info rate ratewait rate_limits rate_due qkwait cancel_reports
--! ARGV: job instance ek info message queue qkey qk_release limit rk rn rw grace_ms qd at cancel_ttl_ms hist_ms
-- Admit: the check a delivered job passes before it may run (worker main process).
-- Checks the worker's lease, then either records the job as running (taking a slot of
-- its execution key, or picking up the slot handed to it on promotion, and a start in
-- its rate key's window), or parks it: behind the holders of its execution key
-- (`parked`), or on its rate key's line (`ratewait`) when its window is full. A job
-- with both takes both or neither: waiting on a rate it holds no slot.
-- KEYS: workers (zset instance -> lease deadline ms), running (hash job -> info json),
--       holders (hash slot -> job), slots, limits, msg (hash job -> message json),
--       promoting (zset job -> deadline), parked (list: this execution key's line),
--       cancelled, cancel_reported, paused, parked_count (hash queue -> parked jobs),
--       stats, qkeys, qk_pending, qk_until, crash_checks, crash_info,
--       rate (zset: this rate key's window), ratewait (list: its line), rate_limits,
--       rate_due, qkwait (list: the job waiting for this queue key), cancel_reports
-- ARGV: job id, worker instance, execution key or '', info json, message json, queue,
--       queue key or '', qk_release ('1': queue_key_until="start"), execution limit,
--       rate key or '', its starts and window ms, grace_ms, on_duplicate ('replace' or
--       ''), its publish time (s), cancel_ttl_ms, hist_ms (how long a job's history is
--       kept; 0: none)
-- A cancelled job is refused first ({'cancelled', 1 if this call claims its on_cancel}),
-- then a job of a paused queue ({'paused'}: the caller stores it for resume).
-- Returns {'nolease'} (the caller admits it later), {'run'}, {'run', earlier attempt's
-- record json} for a redelivered job whose earlier attempt's worker is dead (see
-- record_running in lib.lua), {'parked', position, holder}, or {'ratewait', position,
-- ms until its window may open[, job, message, how]} (the last three: the job promoted
-- to the execution slot this job gave up, which the caller sends as finish.lua's).
-- A job published with on_duplicate="replace" behind a running holder of its queue key
-- waits for that key ({'qkwait', 1, holder}): only the newest such job waits, the older
-- one is cancelled ({'cancelled', ...} for this one when it is the older).
local now = now_ms()
local job, ekey, rk = A.job, A.ek, A.rk

-- Put the job at the end of `line` (its message in `msg`), unless it is in it already (a
-- redelivery of a job parked by a worker that died before acking it): its position.
local function line_up(line, msg, parked_count, id, message, queue)
  if redis.call('HEXISTS', msg, id) == 1 then
    local at = redis.call('LPOS', line, id)
    if at then return at + 1 end
  end
  redis.call('HSET', msg, id, message)
  redis.call('HINCRBY', parked_count, queue, 1)
  return redis.call('RPUSH', line, id)
end
local function admit()
  -- Only under a live lease: a worker whose lease ran out (stopped, stalled) may have had
  -- its jobs taken for dead; it admits nothing until its lease thread has registered again.
  local lease = redis.call('ZSCORE', K.workers, A.instance)
  if not lease or tonumber(lease) <= now then return {'nolease'} end

  local refused = arrival_check(job, A.queue, A.qkey, now, {
    qkeys = K.qkeys, qk_pending = K.qk_pending, cancelled = K.cancelled, cancel_reported = K.cancel_reported,
    stats = K.stats, paused = K.paused})
  if refused then
    drop_reservation(K.rate, K.rate_due, rk, job)
    return refused
  end

  if A.qd == 'replace' and A.qkey ~= '' then
    local holder = redis.call('HGET', K.qkeys, A.qkey)
    if holder == job then
      redis.call('HDEL', K.msg, job)  -- (handed the key by its holder's end: hand_queue_key)
      redis.call('ZREM', K.promoting, job)
    else
      local k = {cancelled = K.cancelled, cancel_reported = K.cancel_reported,
        cancel_reports = K.cancel_reports, stats = K.stats, qkwait = K.qkwait, msg = K.msg,
        parked_count = K.parked_count}
      if not holder then
        -- Its running holder ended before it arrived: the key is its own now.
        redis.call('HSET', K.qkeys, A.qkey, job)
      elseif redis.call('HEXISTS', K.running, holder) == 1 then
        -- It waits for the running holder to end; of those waiting, the newest stays.
        local waiting = redis.call('LINDEX', K.qkwait, 0)
        if waiting and waiting ~= job then
          local decoded = stored_object(K.msg, waiting, redis.call('HGET', K.msg, waiting))
          local at = tonumber(dig(decoded, 'headers', 'roger', 'at'))
          if at and at > (tonumber(A.at) or 0) then
            drop_reservation(K.rate, K.rate_due, rk, job)
            return {'cancelled', cancel_now(k, job, tonumber(A.cancel_ttl_ms), false)}
          end
          cancel_now(k, waiting, tonumber(A.cancel_ttl_ms), true)
        end
        drop_reservation(K.rate, K.rate_due, rk, job)
        line_up(K.qkwait, K.msg, K.parked_count, job, A.message, A.queue)
        return {'qkwait', 1, holder}
      else
        -- Held by a job that has not started: it was published after this one (this one
        -- was sent behind a running holder, which has ended since), so it wins.
        drop_reservation(K.rate, K.rate_due, rk, job)
        return {'cancelled', cancel_now(k, job, tonumber(A.cancel_ttl_ms), false)}
      end
    end
  end

  local slot, own = nil, false
  if ekey ~= '' then
    -- The job holds a slot it may use only when one was handed to it on promotion (it is
    -- not recorded as running); a second delivery of a job recorded as running waits.
    slot = held_slot(K.holders, K.slots, ekey, job)
    own = slot ~= nil and redis.call('HEXISTS', K.running, job) == 0
    if own then
      redis.call('HDEL', K.msg, job)
      redis.call('ZREM', K.promoting, job)
    else
      -- A free slot within the key's limit, unless jobs are parked (no overtaking), or
      -- this job holds a slot already (a second delivery of a job recorded as running: it
      -- waits for that attempt, never taking a second slot).
      local holds = slot ~= nil
      slot = nil
      if not holds and redis.call('LLEN', K.parked) == 0 then
        local limit = key_limit(K.limits, ekey, A.limit)
        for i = 1, limit do
          local free = slot_name(ekey, i)
          if not redis.call('HGET', K.holders, free) then slot = free break end
        end
      end
      if not slot then
        -- (a job promoted from its rate line gives its reservation back: it waits here)
        drop_reservation(K.rate, K.rate_due, rk, job)
        local position = line_up(K.parked, K.msg, K.parked_count, job, A.message, A.queue)
        return {'parked', position, redis.call('HGET', K.holders, ekey) or ''}
      end
    end
  end

  if rk ~= '' then
    if redis.call('ZREM', K.rate, job) == 1 then
      -- Promoted from the rate line: its reservation becomes its start (below).
      redis.call('HDEL', K.msg, job)
      redis.call('ZREM', K.promoting, job)
    else
      local n, w = rate_of(K.rate_limits, rk, A.rn, A.rw)
      local opening = rate_opening(K.rate, n, w, now)
      if opening > 0 or redis.call('LLEN', K.ratewait) > 0 then
        -- It waits on the rate's line, holding nothing: a slot it was handed goes on.
        local handed = {}
        if own then
          local nxt, message, how = pass_slot({
            parked = K.parked, msg = K.msg, parked_count = K.parked_count, holders = K.holders,
            slots = K.slots, promoting = K.promoting, limits = K.limits}, ekey, slot, job,
            tonumber(A.grace_ms))
          if nxt then handed = {nxt, message, how} end
        end
        local position = line_up(K.ratewait, K.msg, K.parked_count, job, A.message, A.queue)
        rate_due_by(K.rate_due, rk, now + opening)
        return {'ratewait', position, opening, handed[1], handed[2], handed[3]}
      end
    end
    redis.call('ZADD', K.rate, now, job .. '@' .. now)
  end

  if slot and not own then take_slot(K.holders, K.slots, ekey, slot, job) end
  if A.qk_release == '1' then  -- queue_key_until="start": the key goes as the job starts
    release_queue_key(K.qkeys, K.qk_pending, A.qkey, job, K.qk_until)
  end
  local crashed = record_running(job, A.info, A.instance, now, {
    workers = K.workers, running = K.running, crash_checks = K.crash_checks, crash_info = K.crash_info})
  if crashed then return {'run', crashed} end
  return {'run'}
end
local reply = admit()
local outcome = reply[1]
if outcome == 'run' then
  history(K.running, 'running', job, A.hist_ms, 'admitted', A.instance,
    ekey ~= '' and ('execution key ' .. ekey) or '')
elseif outcome == 'parked' then
  history(K.running, 'running', job, A.hist_ms, 'parked', A.instance, 'behind execution key '
    .. ekey .. ' at position ' .. reply[2] .. ', held by ' .. reply[3])
elseif outcome == 'ratewait' then
  history(K.running, 'running', job, A.hist_ms, 'waiting for its rate', A.instance,
    'rate key ' .. rk .. ' at position ' .. reply[2])
elseif outcome == 'qkwait' then
  history(K.running, 'running', job, A.hist_ms, 'waiting for its queue key', A.instance,
    A.qkey .. ' held by running ' .. reply[3])
elseif outcome == 'cancelled' then
  history(K.running, 'running', job, A.hist_ms, 'refused: cancelled', A.instance, '')
end
return reply
