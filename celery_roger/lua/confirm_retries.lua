--! KEYS: retry retry_msg
--! ARGV: ...
-- Due retries were published: forget them, unless one was scheduled again meanwhile
-- (its score then differs from the one the tick set).
-- KEYS: retry, retry_msg
-- ARGV: pairs of job id, score set by the tick
for i = 1, #ARGV, 2 do
  local score = redis.call('ZSCORE', K.retry, ARGV[i])
  if score and tonumber(score) == tonumber(ARGV[i + 1]) then
    redis.call('ZREM', K.retry, ARGV[i])
    redis.call('HDEL', K.retry_msg, ARGV[i])
  end
end
return 0
