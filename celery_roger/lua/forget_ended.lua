--! KEYS: running
--! ARGV: job record outcome instance hist_ms
-- The end of a job without keys that its pool process deferred (deferred.py) and no
-- start of that process carried out: forget it as running, if its record is still the
-- one that attempt wrote (and write how it ended to its history).
if forget_ended(K.running, A.job, A.record) then
  history(K.running, 'running', A.job, A.hist_ms, A.outcome, A.instance, '')
end
return 1
