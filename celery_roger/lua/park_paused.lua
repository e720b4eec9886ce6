-- Keep a job of a paused queue in Redis until the queue is resumed (its message is
-- acked, so it is never held unacked by a worker).
-- KEYS: paused_msg (hash job -> stored json), pausedjobs:<queue> (list of job ids),
--       paused_lists (set of queues with held jobs)
-- ARGV: job id, stored json, queue
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('LREM', KEYS[2], 0, ARGV[1])
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[3])
return 1
