"""Retries, the buried queue, callbacks and timeouts (SPEC section 7), with real workers.

Every job's callbacks are recorded on the run's timeline by ``roger_app.Recorder``.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import time

import pytest
from celery.exceptions import TimeLimitExceeded, WorkerLostError
from celery.exceptions import TimeoutError as CeleryTimeout
from kombu.transport import redis as kombu_redis

from celery_roger import BuriedJob, DuplicateJob, JobTimeout, Roger
from celery_roger.runtime import runtime

from .conftest import broker_depth, events, on_redis_broker, wait_until

POOLS = ["prefork", "threads"]


def cbs(r, run, name=None, cb=None):
    return [e for e in events(r, run, "cb")
            if (name is None or e["name"] == name) and (cb is None or e["cb"] == cb)]


def outcomes(r, run, name):
    """The callbacks that end attempts (everything but before_run), in order."""
    return [e["cb"] for e in cbs(r, run, name) if e["cb"] != "before_run"]


def wait_outcomes(r, run, name, n, timeout=30):
    return wait_until(lambda: len(outcomes(r, run, name)) >= n and outcomes(r, run, name),
                      timeout=timeout, what=f"{n} end-of-attempt callbacks of {name}")


def final_state(app, job_id, timeout=20):
    """Poll the result backend (an AsyncResult that saw FAILURE keeps it, as in Celery)."""
    return wait_until(lambda: (s := app.AsyncResult(job_id).state) in ("SUCCESS", "FAILURE")
                      and s, timeout=timeout, what=f"job {job_id} to end")


def attempts(r, run, name):
    return [e for e in events(r, run, "attempt") if e["name"] == name]


# -- Roger's callbacks_test and retry_test -------------------------------------------------


def test_before_run_and_after_run_with_state_and_result(app_module, run, r, worker):
    """Roger scenarios 38, 39, 40: before_run fires; its return value is after_run's state."""
    worker()
    result = app_module.fragile.apply_async((run, "ok"), queue_key=f"{run}:qk",
                                            execution_key=f"{run}:ek")
    assert result.get(timeout=20) == "ok"
    before, after = wait_until(lambda: len(cbs(r, run, "ok")) == 2 and cbs(r, run, "ok"),
                               timeout=10, what="before_run and after_run")
    assert before["cb"] == "before_run" and before["partition"] == "test"
    assert after["cb"] == "after_run"
    assert after["state"] == f"state-{result.id}"
    assert after["result"] == "ok"
    # after_run runs after the result is stored and the keys are released.
    assert after["stored"] == "SUCCESS" and after["qk_free"] and after["ek_free"]
    assert after["qk"] == f"{run}:qk" and after["ek"] == f"{run}:ek"
    assert after["queue"] == f"q-{run}" and after["rc"] == 0
    assert before["queued_at"] <= before["started_at"] <= after["t"]


def test_the_callbacks_are_signals_too(app_module, run, r, worker):
    worker()
    ok = app_module.fragile.delay(run, "ok")
    bad = app_module.once.delay(run, "bad", "fail")
    assert ok.get(timeout=20) == "ok"
    wait_outcomes(r, run, "bad", 2)

    def signals_of(job_id):
        return wait_until(lambda: [(e["signal"], e["keys"], e["state"])
                                   for e in events(r, run, "signal") if e["job"] == job_id],
                          timeout=5, what="signals")
    wait_until(lambda: len(signals_of(ok.id)) == 2 and len(signals_of(bad.id)) == 4,
               timeout=5, what="every signal")
    assert signals_of(ok.id) == [("before_run", [], None),
                                 ("after_run", ["result", "state"], f"state-{ok.id}")]
    assert [s[:2] for s in signals_of(bad.id)] == [
        ("before_run", []), ("on_error", ["error", "state", "traceback"]),
        ("before_run", []), ("on_buried", ["error", "state", "traceback"])]


def test_celerys_own_autoretry_on_a_roger_task(app_module, run, r, worker):
    """Celery's retry works as in Celery; roger's retry_count is untouched."""
    worker()
    result = app_module.celery_retry.apply_async((run, "a", "fail1"), queue_key=f"{run}:qk")
    assert result.get(timeout=20) == "a"
    assert wait_outcomes(r, run, "a", 2) == ["on_error", "after_run"]
    assert [e["rc"] for e in cbs(r, run, "a") if e["cb"] != "before_run"] == [0, 0]
    assert runtime(app_module.app).store.queue_key_holder(f"{run}:qk") is None


def test_non_retryable_error_fails_at_once_with_on_error(app_module, run, r, worker):
    """Roger scenario 41: on_error gets the exception and a traceback naming the job."""
    worker()
    result = app_module.fragile.delay(run, "err", "fail")
    with pytest.raises(RuntimeError, match="boom err"):
        result.get(timeout=20)
    assert wait_outcomes(r, run, "err", 1) == ["on_error"]
    (error,) = cbs(r, run, "err", "on_error")
    assert error["error"] == "RuntimeError" and error["message"] == "boom err"
    assert "in act" in error["traceback"] and 'raise RuntimeError(f"boom {name}")' in \
        error["traceback"]
    assert error["state"] == f"state-{result.id}"
    time.sleep(1.5)  # nothing else may follow: no retry, no burial
    assert len(attempts(r, run, "err")) == 1 and outcomes(r, run, "err") == ["on_error"]
    assert Roger(app_module.app).buried(f"q-{run}") == []


@pytest.mark.parametrize("pool", POOLS)
def test_retry_levels_then_buried(app_module, run, r, worker, pool):
    """Roger scenario 43: levels [1, 1, 1]: on_error at retry_count 0, 1, 2, then on_buried."""
    worker(pool=pool)
    result = app_module.retrying.delay(run, "a", "fail")
    assert wait_outcomes(r, run, "a", 4) == ["on_error", "on_error", "on_error", "on_buried"]
    ends = [e for e in cbs(r, run, "a") if e["cb"] != "before_run"]
    assert [e["rc"] for e in ends] == [0, 1, 2, 3]
    gaps = [b["t"] - a["t"] for a, b in itertools.pairwise(ends)]
    assert all(0.9 <= g <= 1.6 for g in gaps), f"retry delays of 1s observed as {gaps}"
    assert len(attempts(r, run, "a")) == 4  # 1 + len(levels) executions
    assert result.state == "FAILURE"
    with pytest.raises(RuntimeError):
        result.get(timeout=5)
    (buried,) = Roger(app_module.app).buried(f"q-{run}")
    assert isinstance(buried, BuriedJob)
    assert (buried.id, buried.task, buried.args, buried.retry_count) == (
        result.id, "roger_app.retrying", (run, "a", "fail"), 3)
    assert buried.error == "RuntimeError: boom a" and buried.error_type == "RuntimeError"
    assert "boom" in (buried.traceback or "")
    assert buried.queue == f"q-{run}" and time.time() - buried.buried_at < 10


def test_buried_cap_drops_oldest_and_counts(app_module, run, r, worker):
    """Roger scenario 44: retry_levels [0], 101 failing jobs, a cap of 100."""
    worker(concurrency=4, env={"ROGER_TEST_BURIED_MAX": "100"})
    ids = [app_module.once.delay(run, f"j{i}", "fail").id for i in range(101)]
    wait_until(lambda: len(cbs(r, run, cb="on_buried")) == 101, timeout=90,
               what="101 on_buried callbacks")
    roger = Roger(app_module.app)
    buried = roger.buried(f"q-{run}", limit=1000)
    assert len(buried) == 100
    assert {b.id for b in buried} < set(ids)
    assert roger.buried_dropped().get(f"q-{run}") == 1
    assert len(cbs(r, run, cb="on_error")) == 101  # one per first attempt
    assert all(b.retry_count == 1 for b in buried)


# -- retries in Redis, keys between attempts ---------------------------------------------


def test_retry_waits_in_redis_without_keys_and_survives_a_worker_restart(
        app_module, run, r, worker):
    w = worker()
    result = app_module.keyed_slow_retry.delay(run, "a", "fail1")
    wait_outcomes(r, run, "a", 1)
    store = runtime(app_module.app).store
    due = store.retry_due_at(result.id)
    assert due is not None and 0.5 < due - time.time() <= 2.5
    assert result.state == "RETRY"
    # Waiting for its retry, the job holds neither key and is not in the broker.
    assert store.queue_key_holder(f"{run}:q:a") is None
    assert store.execution_key_holder(f"{run}:e") is None
    assert broker_depth(app_module.app, f"q-{run}") == 0
    # The worker that failed it goes away; another one publishes and runs the retry.
    w.stop()
    worker()
    assert result.get(timeout=20) == "a"
    assert [e["n"] for e in attempts(r, run, "a")] == [1, 2]
    assert store.retry_due_at(result.id) is None


def test_a_retry_does_not_take_the_queue_key_again(app_module, run, r, worker):
    worker()
    first = app_module.keyed_slow_retry.delay(run, "a", "fail1")
    wait_outcomes(r, run, "a", 1)
    # The queue key is free while the first job waits: a new job with it is accepted.
    second = app_module.keyed_slow_retry.delay(run, "a")
    assert second.id != first.id
    assert second.get(timeout=20) == "a" and first.get(timeout=20) == "a"


def test_execution_key_is_released_between_attempts(app_module, run, r, worker):
    worker(concurrency=2)
    failing = app_module.keyed_slow_retry.delay(run, "a", "fail1")
    other = app_module.keyed_slow_retry.delay(run, "b", "sleep", 0.2)
    assert other.get(timeout=20) == "b"
    assert failing.get(timeout=20) == "a"
    b_done = next(e for e in events(r, run, "done") if e["name"] == "b")
    a_retry = attempts(r, run, "a")[1]
    assert b_done["t"] < a_retry["t"], "b ran in a's 2 s wait for its retry"


def test_retryable_error_asks_for_its_own_delay(app_module, run, r, worker):
    worker()
    result = app_module.fragile.delay(run, "a", "ask1.5")  # not retryable, but asks
    assert result.get(timeout=20) == "a"
    first, second = attempts(r, run, "a")
    assert 1.4 <= second["t"] - first["t"] <= 2.5
    (error,) = cbs(r, run, "a", "on_error")
    assert error["error"] == "RetryableError" and error["rc"] == 0
    after = wait_until(lambda: cbs(r, run, "a", "after_run"), timeout=5, what="after_run")
    assert after[0]["rc"] == 1


# -- timeouts and crashes ----------------------------------------------------------------


@pytest.mark.parametrize("pool", POOLS)
def test_timeout(app_module, run, r, worker, pool):
    """Roger scenarios 18 and 19: max_execution_time 1; 1.1 s times out, 50 ms completes."""
    worker(pool=pool)
    slow = app_module.limited.delay(run, "slow", "sleep", 1.1)
    fast = app_module.limited.delay(run, "fast", "sleep", 0.05)
    assert fast.get(timeout=20) == "fast"
    (error,) = wait_until(lambda: cbs(r, run, "slow", "on_error"), timeout=10,
                          what="on_error for the timeout")
    assert error["error"] == "JobTimeout" and error["state"] is None
    start = attempts(r, run, "slow")[0]["t"]
    assert error["t"] - start <= 2.0
    with pytest.raises((TimeLimitExceeded, JobTimeout)):
        slow.get(timeout=10)
    assert slow.state == "FAILURE"
    if pool == "prefork":  # the job was killed: it never completed
        assert not [e for e in events(r, run, "done") if e["name"] == "slow"]
    assert outcomes(r, run, "slow") == ["on_error"]


def test_timeout_is_retried_when_retryable(app_module, run, r, worker):
    worker()
    result = app_module.limited_retry.delay(run, "a", "sleep1", 3)
    assert result.get(timeout=20) == "a"
    assert wait_outcomes(r, run, "a", 2) == ["on_error", "after_run"]
    assert cbs(r, run, "a", "on_error")[0]["error"] == "JobTimeout"


def test_child_sigkill_is_retried_when_retryable(app_module, run, r, worker):
    w = worker()
    result = app_module.once.delay(run, "a", "crash1")
    assert result.get(timeout=30) == "a"
    assert wait_outcomes(r, run, "a", 2) == ["on_error", "after_run"]
    (error,) = cbs(r, run, "a", "on_error")
    assert error["error"] == "WorkerCrashed" and error["state"] is None
    assert error["pid"] == w.pid, "a crash's callbacks run in the worker's main process"
    assert [e["n"] for e in attempts(r, run, "a")] == [1, 2]


def test_child_sigkill_fails_when_not_retryable(app_module, run, r, worker):
    worker()
    result = app_module.fragile.apply_async((run, "a", "crash"), queue_key=f"{run}:qk")
    with pytest.raises(WorkerLostError):
        result.get(timeout=30)
    assert result.state == "FAILURE"
    assert wait_outcomes(r, run, "a", 1) == ["on_error"]
    assert cbs(r, run, "a", "on_error")[0]["error"] == "WorkerCrashed"
    assert runtime(app_module.app).store.queue_key_holder(f"{run}:qk") is None
    time.sleep(1)
    assert len(attempts(r, run, "a")) == 1 and outcomes(r, run, "a") == ["on_error"]


def test_child_sigkill_on_last_level_is_buried(app_module, run, r, worker):
    worker()
    result = app_module.once.delay(run, "a", "crash")
    assert wait_outcomes(r, run, "a", 2) == ["on_error", "on_buried"]
    (buried,) = Roger(app_module.app).buried(f"q-{run}")
    assert buried.id == result.id and buried.error.startswith("WorkerCrashed")
    assert result.state == "FAILURE"


@pytest.mark.skipif(
    on_redis_broker() and not hasattr(kombu_redis.Channel, "unacked_restore_interval"),
    reason="this kombu restores unacked messages only every ~100 s (not configurable)",
)
@pytest.mark.parametrize("keyed", [False, True], ids=["no-execution-key", "execution-key"])
@pytest.mark.parametrize(("lease", "visibility"), [
    pytest.param("3", "8", id="lease-ends-first", marks=pytest.mark.redis_broker(
        "RabbitMQ redelivers as soon as the worker's connection closes, before any lease "
        "ends (the redelivered-first case)")),
    pytest.param("6", "2", id="redelivered-first"),
])
def test_whole_worker_crash_redelivers_and_reports_once(app_module, run, r, worker, lease,
                                                         visibility, keyed):
    """Late ack: the job's message comes back; another worker reports the crash once,
    whether it notices the dead lease first or receives the redelivered job first.
    (On Redis the message comes back after the visibility timeout; RabbitMQ redelivers it
    as soon as the dead worker's connection closes.)"""
    env = {"ROGER_TEST_LEASE": lease, "ROGER_TEST_VISIBILITY": visibility}
    doomed = worker(env=env)
    worker(env=env)
    result = app_module.fragile.apply_async((run, "a", "sleep1", 60), queue_key=f"{run}:qk",
                                            execution_key=f"{run}:ek" if keyed else None)
    (first,) = wait_until(lambda: attempts(r, run, "a"), timeout=10, what="the first attempt")
    survivor_runs = first["pid"] not in _children(doomed.pid)
    if survivor_runs:
        pytest.skip("the job went to the worker that is not killed")  # pragma: no cover
    os.killpg(doomed.pid, signal.SIGKILL)
    assert final_state(app_module.app, result.id, timeout=60) == "SUCCESS"
    # Redelivered first, the crash is reported once the dead worker's lease has ended.
    assert sorted(wait_outcomes(r, run, "a", 2)) == ["after_run", "on_error"]
    (error,) = cbs(r, run, "a", "on_error")
    assert error["error"] == "WorkerCrashed" and error["state"] is None
    assert error["job"] == result.id and error["qk"] == f"{run}:qk"
    assert [e["n"] for e in attempts(r, run, "a")] == [1, 2]
    time.sleep(float(lease) + 1)
    assert sorted(outcomes(r, run, "a")) == ["after_run", "on_error"]


def _children(pid: int) -> set[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()} | {pid}


# -- callbacks that raise ----------------------------------------------------------------


@pytest.mark.parametrize("place", ["before_run", "after_run"])
def test_a_raising_callback_changes_nothing_on_success(app_module, run, r, worker, place):
    worker()
    result = app_module.once.apply_async((run, "a"), {"raise_in": place},
                                         queue_key=f"{run}:qk")
    assert result.get(timeout=20) == "a"
    wait_outcomes(r, run, "a", 1)
    time.sleep(0.5)
    assert outcomes(r, run, "a") == ["after_run"] and len(attempts(r, run, "a")) == 1
    assert result.state == "SUCCESS"
    assert runtime(app_module.app).store.queue_key_holder(f"{run}:qk") is None


@pytest.mark.parametrize("place", ["on_error", "on_buried"])
def test_a_raising_callback_changes_nothing_on_failure(app_module, run, r, worker, place):
    worker()
    result = app_module.once.apply_async((run, "a", "fail"), {"raise_in": place})
    assert wait_outcomes(r, run, "a", 2) == ["on_error", "on_buried"]
    assert [b.id for b in Roger(app_module.app).buried(f"q-{run}")] == [result.id]
    assert result.state == "FAILURE" and len(attempts(r, run, "a")) == 2


def test_a_raising_callback_in_the_main_process_changes_nothing(app_module, run, r, worker):
    w = worker()
    result = app_module.once.apply_async((run, "a", "crash1"), {"raise_in": "on_error"})
    assert result.get(timeout=30) == "a"
    assert w.is_alive()


# -- the buried queue --------------------------------------------------------------------


def test_requeue_keeps_the_id_resets_the_count_and_respects_a_held_queue_key(
        app_module, run, r, worker):
    worker(concurrency=2)
    roger = Roger(app_module.app)
    buried = app_module.keyed.delay(run, "a", "fail2")  # fails twice: buried
    wait_until(lambda: roger.buried(f"q-{run}"), timeout=20, what="burial")
    # Another job takes the same queue key: the buried job cannot come back yet.
    holder = app_module.keyed.apply_async((run, "a", "sleep", 2.0), task_id=f"{run}-holder")
    wait_until(lambda: [e for e in attempts(r, run, "a") if e["n"] == 3], timeout=10,
               what="the holder to start")
    assert roger.requeue_buried(buried.id) == 0
    assert [b.id for b in roger.buried(f"q-{run}")] == [buried.id]
    assert holder.get(timeout=20) == "a"
    # The queue is paused so the requeued job stays pending (RabbitMQ would hand it to the
    # worker, which would finish it, before the next publish).
    roger.pause(f"q-{run}")
    assert roger.requeue_buried(buried.id) == 1
    assert roger.buried(f"q-{run}") == []
    # While the requeued job is pending, its queue key is held again.
    with pytest.raises(DuplicateJob):
        app_module.keyed.delay(run, "a")
    roger.resume(f"q-{run}")
    assert final_state(app_module.app, buried.id) == "SUCCESS"  # same id, 4th attempt
    after = wait_until(lambda: cbs(r, run, "a", "after_run"), timeout=5, what="after_run")
    assert after[-1]["rc"] == 0 and after[-1]["job"] == buried.id
    assert roger.requeue_buried(buried.id) == 0  # gone


def test_requeue_all_and_purge(app_module, run, r, worker):
    worker(concurrency=2)
    roger = Roger(app_module.app)
    jobs = [app_module.once.delay(run, f"j{i}", "fail2") for i in range(5)]
    wait_until(lambda: len(roger.buried(f"q-{run}")) == 5, timeout=30, what="5 burials")
    assert roger.requeue_buried(queue=f"q-{run}", all=True) == 5
    assert [final_state(app_module.app, j.id) for j in jobs] == ["SUCCESS"] * 5
    failing = [app_module.once.delay(run, f"k{i}", "fail") for i in range(3)]
    wait_until(lambda: len(roger.buried(f"q-{run}")) == 3, timeout=30, what="3 burials")
    assert roger.purge_buried(f"q-{run}") == 3
    assert roger.buried(f"q-{run}") == [] and roger.purge_buried(f"q-{run}") == 0
    # A burial is recorded in the attempt, before Celery stores the FAILURE: poll for it.
    assert [final_state(app_module.app, f.id) for f in failing] == ["FAILURE"] * 3


def test_buried_listing_pages_newest_first(app_module, run):
    roger = Roger(app_module.app)
    store = roger.store
    queue = f"q-{run}"
    for i in range(1000):
        store.bury(f"{run}-{i}", queue, {"id": f"{run}-{i}", "task": "t", "queue": queue,
                                         "retry_count": 12, "error": "E: x", "buried_at": i})
    started = time.perf_counter()
    page = roger.buried(queue, limit=100, offset=100)
    elapsed = time.perf_counter() - started
    assert [b.id for b in page] == [f"{run}-{i}" for i in range(899, 799, -1)]
    assert elapsed < 1.0, f"listing page 2 of 1000 took {elapsed:.3f}s"
    assert roger.buried(queue, limit=5, offset=998) == roger.buried(queue, limit=2,
                                                                     offset=998)
    assert len(roger.buried(None, limit=2000)) >= 1000
    assert roger.purge_buried(queue) == 1000


def test_bad_arguments_name_what_is_wrong(app_module):
    roger = Roger(app_module.app)
    with pytest.raises(ValueError, match="limit"):
        roger.buried(limit=-1)
    with pytest.raises(ValueError, match="queue"):
        roger.buried(queue="")
    with pytest.raises(ValueError, match="all=True"):
        roger.requeue_buried(queue="x")
    with pytest.raises(ValueError, match="either"):
        roger.requeue_buried("id", queue="x", all=True)
    assert roger.requeue_buried("no-such-job") == 0


# -- eager mode ----------------------------------------------------------------------------


def test_eager_apply_runs_inline_without_roger_retries_or_callbacks(app_module, run, r):
    result = app_module.once.apply((run, "a", "fail"))
    assert result.state == "FAILURE" and isinstance(result.result, RuntimeError)
    assert len(attempts(r, run, "a")) == 1 and cbs(r, run) == []
    assert app_module.once.apply((run, "b")).get() == "b"


def test_get_on_a_retrying_job_waits_for_the_final_outcome(app_module, run, worker):
    worker()
    result = app_module.retrying.delay(run, "a", "fail1")
    with pytest.raises(CeleryTimeout):
        result.get(timeout=0.5)
    assert result.get(timeout=20) == "a"


def test_a_bad_roger_callbacks_setting_stops_the_worker_at_start(worker):
    with pytest.raises(RuntimeError, match=r"roger_callbacks: cannot import 'no_such_module\.X'"):
        worker(env={"ROGER_TEST_CALLBACKS": "no_such_module.X"})
