--! KEYS: running
--! ARGV: job record
-- The end of a job without keys that its pool process deferred (deferred.py) and no
-- start of that process carried out: forget it as running, if its record is still the
-- one that attempt wrote.
forget_ended(K.running, A.job, A.record)
return 1
