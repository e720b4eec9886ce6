--! KEYS: buried buried_queue buried_msg qkeys qk_pending
--! ARGV: job qkey prefix hist_ms
-- Requeue a buried job, step 2: its message is in the broker; remove its entry (and its
-- filter indexes) and confirm the queue key step 1 took (held until the job's attempt ends).
-- KEYS: buried, buried:<queue>, buried_msg, qkeys, qk_pending
-- ARGV: job id, queue key or '', key prefix
local removed = redis.call('HDEL', K.buried_msg, A.job)
redis.call('ZREM', K.buried, A.job)
redis.call('ZREM', K.buried_queue, A.job)
buried_index_remove(A.prefix, A.job)
if removed == 1 then history(K.buried, 'buried', A.job, A.hist_ms, 'requeued', '', '') end
if A.qkey ~= '' and redis.call('HGET', K.qkeys, A.qkey) == A.job then
  redis.call('ZREM', K.qk_pending, A.qkey)
end
return removed
