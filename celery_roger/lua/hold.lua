--! KEYS: held_msg held_queue held_queues
--! ARGV: job stored queue hist_ms
-- Keep a job of a paused queue in Redis until the queue is resumed (its message is
-- acked, so it is never held unacked by a worker).
-- KEYS: held_msg (hash job -> stored json), held:<queue> (list of job ids),
--       held_queues (set of queues with held jobs)
-- ARGV: job id, stored json, queue
redis.call('HSET', K.held_msg, A.job, A.stored)
redis.call('LREM', K.held_queue, 0, A.job)
redis.call('RPUSH', K.held_queue, A.job)
redis.call('SADD', K.held_queues, A.queue)
history(K.held_msg, 'held_msg', A.job, A.hist_ms, 'held', '', 'queue ' .. A.queue .. ' is paused')
return 1
