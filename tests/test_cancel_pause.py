"""Cluster-wide cancellation and per-queue pause/resume (SPEC sections 5 and 6), with real
workers. Callbacks are recorded on the run's timeline by ``roger_app.Recorder``."""

from __future__ import annotations

import time

import pytest

from celery_roger import DuplicateJob, Roger

from .conftest import broker_depth, events, wait_until

POOLS = ["prefork", "threads"]


def cbs(r, run, cb, name=None):
    return [e for e in events(r, run, "cb") if e["cb"] == cb and (name is None or
                                                                  e["name"] == name)]


def attempts(r, run, name=None):
    return [e for e in events(r, run, "attempt") if name is None or e["name"] == name]


def done(r, run, name=None):
    return [e for e in events(r, run, "done") if name is None or e["name"] == name]


def state(app, job_id, want, timeout=15):
    return wait_until(lambda: app.AsyncResult(job_id).state == want, timeout=timeout,
                      what=f"job {job_id} to be {want} (is {app.AsyncResult(job_id).state})")


@pytest.fixture
def roger(app_module):
    return Roger(app_module.app)


# -- cancellation --------------------------------------------------------------------------


def test_cancel_is_remembered(app_module, roger):
    """Roger scenario 11: a cancel is stored; asking does not consume it."""
    assert roger.cancel("some-job") == ""
    assert roger.store.is_cancelled("some-job") and roger.store.is_cancelled("some-job")


def test_cancel_right_after_publish(app_module, run, r, roger, worker):
    """Roger scenario 12: on_cancel with the same id within 1 s; the job never runs."""
    worker()
    result = app_module.fragile.apply_async((run, "a", "sleep", 0.5), queue_key=f"{run}:qk",
                                            countdown=0.3)
    started = time.time()
    roger.cancel(result.id)
    (cancel,) = wait_until(lambda: cbs(r, run, "on_cancel"), timeout=5, what="on_cancel")
    assert cancel["job"] == result.id and cancel["t"] - started < 1.0
    state(app_module.app, result.id, "REVOKED")
    assert attempts(r, run) == []
    assert roger.store.queue_key_holder(f"{run}:qk") is None
    app_module.fragile.apply_async((run, "b"), queue_key=f"{run}:qk")  # not a duplicate


@pytest.mark.parametrize("pool", POOLS)
def test_cancel_a_running_job(app_module, run, r, roger, worker, pool):
    """Roger scenario 13: the running job is stopped (prefork) and on_cancel fires."""
    worker(pool=pool)
    duration = 3.0 if pool == "prefork" else 1.0
    result = app_module.fragile.apply_async((run, "a", "sleep", duration),
                                            queue_key=f"{run}:qk", execution_key=f"{run}:ek")
    wait_until(lambda: attempts(r, run, "a"), timeout=10, what="the job to start")
    cancelled_at = time.time()
    assert roger.cancel(result.id) == "running"
    (cancel,) = wait_until(lambda: cbs(r, run, "on_cancel"), timeout=10, what="on_cancel")
    state(app_module.app, result.id, "REVOKED")
    if pool == "prefork":
        assert cancel["t"] - cancelled_at < 2.0, "stopped within 2 s"
        time.sleep(duration)
        assert done(r, run) == [], "the killed job never finished its body"
    else:
        # threads cannot kill: the job ends, and is reported cancelled, not successful.
        wait_until(lambda: done(r, run), timeout=10, what="the body to return")
    assert cbs(r, run, "after_run") == [] and cbs(r, run, "on_error") == []
    store = roger.store
    assert store.queue_key_holder(f"{run}:qk") is None
    assert store.execution_key_holder(f"{run}:ek") is None
    time.sleep(1.0)
    assert len(cbs(r, run, "on_cancel")) == 1


def test_cancel_half_of_1000_queued_jobs(app_module, run, r, roger, worker):
    jobs = [app_module.fragile.delay(run, f"j{i}") for i in range(1000)]
    cancelled = {j.id for j in jobs[::2]}
    for job_id in cancelled:
        roger.cancel(job_id)
    worker(concurrency=4)  # a worker that starts after the cancels
    wait_until(lambda: len(done(r, run)) + len(cbs(r, run, "on_cancel")) >= 1000,
               timeout=120, what="1000 jobs run or cancelled")
    ran = {e["name"] for e in done(r, run)}
    assert ran == {f"j{i}" for i in range(1, 1000, 2)}
    reports = [e["job"] for e in cbs(r, run, "on_cancel")]
    assert len(reports) == 500 and set(reports) == cancelled


def test_cancel_a_parked_job_keeps_the_key_exclusive(app_module, run, r, roger, worker):
    worker(concurrency=4)
    key = f"{run}:ek"
    holder = app_module.fragile.apply_async((run, "holder", "sleep", 1.5), execution_key=key)
    wait_until(lambda: attempts(r, run, "holder"), timeout=10, what="the holder to start")
    parked = app_module.fragile.apply_async((run, "parked"), execution_key=key,
                                            queue_key=f"{run}:qk")
    after = app_module.fragile.apply_async((run, "after", "sleep", 0.2), execution_key=key)
    wait_until(lambda: roger.store.parked_ids(key) == [parked.id, after.id], timeout=10,
               what="two parked jobs")
    assert roger.cancel(parked.id) == "parked"
    assert roger.store.parked_ids(key) == [after.id]
    assert roger.store.execution_key_holder(key) == holder.id  # untouched
    assert roger.store.queue_key_holder(f"{run}:qk") is None
    assert after.get(timeout=20) == "after"
    assert [e["name"] for e in attempts(r, run)] == ["holder", "after"]
    hold = attempts(r, run, "holder")[0]
    assert done(r, run, "holder")[0]["t"] <= attempts(r, run, "after")[0]["t"]
    assert hold["t"] < done(r, run, "holder")[0]["t"]
    wait_until(lambda: cbs(r, run, "on_cancel"), timeout=5, what="on_cancel of the parked job")
    assert [e["job"] for e in cbs(r, run, "on_cancel")] == [parked.id]
    state(app_module.app, parked.id, "REVOKED")


def test_cancel_a_running_job_on_another_worker(app_module, run, r, roger, worker):
    other = f"q-{run}-other"
    worker()  # consumes q-<run>
    remote = worker(queues=[other])
    result = app_module.fragile.apply_async((run, "a", "sleep", 5), queue=other)
    wait_until(lambda: attempts(r, run, "a"), timeout=10, what="the job to start")
    started = time.time()
    assert roger.cancel(result.id) == "running"
    state(app_module.app, result.id, "REVOKED", timeout=5)
    assert time.time() - started < 2.0
    assert cbs(r, run, "on_cancel")[0]["job"] == result.id
    assert remote.is_alive()


def test_cancel_a_job_waiting_for_its_retry(app_module, run, r, roger, worker):
    worker()
    result = app_module.keyed_slow_retry.delay(run, "a", "fail")
    wait_until(lambda: cbs(r, run, "on_error"), timeout=10, what="the first failure")
    assert roger.cancel(result.id) == "retry"
    wait_until(lambda: cbs(r, run, "on_cancel"), timeout=5, what="on_cancel")
    state(app_module.app, result.id, "REVOKED")
    time.sleep(2.5)  # past its retry delay
    assert len(attempts(r, run, "a")) == 1 and roger.store.retry_due_at(result.id) is None


def test_the_same_id_delivered_twice_is_cancelled_once(app_module, run, r, roger, worker):
    job_id = f"{run}-twice"
    app_module.fragile.apply_async((run, "a"), task_id=job_id, countdown=0.5)
    app_module.fragile.apply_async((run, "a"), task_id=job_id, countdown=0.5)
    roger.cancel(job_id)
    worker()
    wait_until(lambda: cbs(r, run, "on_cancel"), timeout=10, what="on_cancel")
    time.sleep(2)
    assert len(cbs(r, run, "on_cancel")) == 1 and attempts(r, run) == []


def test_cancel_unknown_or_finished_is_harmless(app_module, run, r, roger, worker):
    worker()
    result = app_module.fragile.delay(run, "a")
    assert result.get(timeout=10) == "a"
    wait_until(lambda: not roger.store.redis.hexists(roger.store.k_running, result.id),
               timeout=5, what="the attempt's end")  # the result is stored just before
    assert roger.cancel(result.id) == ""
    assert roger.cancel("no-such-job") == ""
    time.sleep(1)
    assert result.state == "SUCCESS" and cbs(r, run, "on_cancel") == []
    with pytest.raises(ValueError, match="job_id"):
        roger.cancel("")


@pytest.mark.parametrize("terminate", [False, True])
def test_celerys_own_revoke_has_the_same_effect(app_module, run, r, roger, worker, terminate):
    worker(concurrency=2)
    key = f"{run}:ek"
    holder = app_module.fragile.apply_async((run, "holder", "sleep", 2.0), execution_key=key,
                                            queue_key=f"{run}:qk-holder")
    wait_until(lambda: attempts(r, run, "holder"), timeout=10, what="the holder to start")
    parked = app_module.fragile.apply_async((run, "parked"), execution_key=key,
                                            queue_key=f"{run}:qk")
    wait_until(lambda: roger.store.parked_ids(key) == [parked.id], timeout=10, what="parking")
    target, name = (holder, "holder") if terminate else (parked, "parked")
    target.revoke(terminate=terminate, signal="SIGKILL")
    wait_until(lambda: cbs(r, run, "on_cancel"), timeout=10, what="on_cancel")
    state(app_module.app, target.id, "REVOKED")
    if terminate:  # the holder was killed; the parked job gets the key and runs
        assert parked.get(timeout=10) == "parked"
        assert roger.store.queue_key_holder(f"{run}:qk-holder") is None
    else:  # the parked copy was dropped and its queue key released
        wait_until(lambda: roger.store.parked_ids(key) == [], timeout=5, what="drop")
        assert roger.store.queue_key_holder(f"{run}:qk") is None
        assert holder.get(timeout=10) == "holder"
    time.sleep(1.5)
    assert [e["job"] for e in cbs(r, run, "on_cancel")] == [target.id]
    assert len(attempts(r, run, name)) == (1 if terminate else 0)


def test_expired_job_reports_on_cancel_once(app_module, run, r, roger, worker):
    result = app_module.fragile.apply_async((run, "a"), queue_key=f"{run}:qk", expires=0.5)
    time.sleep(1)
    worker()
    wait_until(lambda: cbs(r, run, "on_cancel"), timeout=10, what="on_cancel")
    state(app_module.app, result.id, "REVOKED")
    assert roger.store.queue_key_holder(f"{run}:qk") is None and attempts(r, run) == []


# -- pause and resume ------------------------------------------------------------------------


def test_paused_set(roger, run):
    """Roger scenario 33."""
    queues = {f"{run}-default", f"{run}-fast", f"{run}-expression"}
    for q in queues:
        roger.pause(q)
    assert queues <= roger.paused_queues()
    for q in roger.paused_queues() & queues:
        roger.resume(q)
    assert not (queues & roger.paused_queues())


@pytest.mark.parametrize("pool", POOLS)
def test_pause_then_publish_then_resume(app_module, run, r, roger, worker, pool):
    """Roger scenarios 21 and 23: a paused queue runs nothing until resumed."""
    queue = f"q-{run}"
    worker(pool=pool)
    roger.pause(queue, reason="incident 42")
    assert roger.store.paused()[queue]["reason"] == "incident 42"
    result = app_module.fragile.delay(run, "a")
    time.sleep(1.5)
    assert attempts(r, run) == []
    resumed = time.time()
    roger.resume(queue)
    assert result.get(timeout=10) == "a"
    assert attempts(r, run)[0]["t"] - resumed < 2.0


def test_pause_survives_a_worker_restart(app_module, run, r, roger, worker):
    """Roger scenario 24, with a real restart; and a pause before any worker starts."""
    queue = f"q-{run}"
    roger.pause(queue)
    result = app_module.fragile.delay(run, "a")
    w = worker()
    time.sleep(1.5)
    w.stop()
    worker()
    time.sleep(1.5)
    assert attempts(r, run) == []
    roger.resume(queue)
    assert result.get(timeout=10) == "a"


def test_pause_with_jobs_already_prefetched(app_module, run, r, roger, worker):
    queue = f"q-{run}"
    worker(concurrency=1, env={"ROGER_TEST_PREFETCH": "4"})
    first = app_module.fragile.delay(run, "first", "sleep", 1.5)
    rest = [app_module.fragile.delay(run, f"r{i}") for i in range(5)]
    wait_until(lambda: attempts(r, run, "first"), timeout=10, what="the first job")
    time.sleep(0.3)  # let the worker prefetch the rest
    roger.pause(queue)
    paused_at = time.time()
    assert first.get(timeout=10) == "first"  # the running job finishes
    time.sleep(1.5)
    assert [e for e in attempts(r, run) if e["t"] > paused_at] == []
    # The prefetched jobs are not held unacked by the worker: each is held in Redis or
    # ready in the broker (whose count leaves out what it delivered and awaits an ack for).
    assert roger.store.held_count(queue) >= 1
    assert roger.store.held_count(queue) + broker_depth(app_module.app, queue) == 5
    resumed = time.time()
    roger.resume(queue)
    assert [j.get(timeout=15) for j in rest] == [f"r{i}" for i in range(5)]
    assert min(e["t"] for e in attempts(r, run) if e["name"] != "first") - resumed < 2.0


def test_held_job_keeps_its_queue_key_and_can_be_cancelled(app_module, run, r, roger, worker):
    queue = f"q-{run}"
    worker()
    roger.pause(queue)
    job = app_module.fragile.apply_async((run, "a"), queue_key=f"{run}:qk")
    with pytest.raises(DuplicateJob):
        app_module.fragile.apply_async((run, "a"), queue_key=f"{run}:qk")
    roger.cancel(job.id)
    roger.resume(queue)
    wait_until(lambda: cbs(r, run, "on_cancel"), timeout=10, what="on_cancel")
    assert attempts(r, run) == [] and roger.store.queue_key_holder(f"{run}:qk") is None


def test_resume_does_not_widen_what_a_worker_consumes(app_module, run, r, roger, worker):
    qa, qb = f"q-{run}-a", f"q-{run}-b"
    a = worker(queues=[qa])
    b = worker(queues=[qb])
    roger.pause(qa)
    roger.pause(qb)
    roger.resume(qa)
    roger.resume(qb)
    ja = app_module.fragile.apply_async((run, "a"), queue=qa)
    jb = app_module.fragile.apply_async((run, "b"), queue=qb)
    assert ja.get(timeout=10) == "a" and jb.get(timeout=10) == "b"

    def consumed():
        replies = app_module.app.control.inspect(timeout=1.0).active_queues() or {}
        return {name: sorted(q["name"] for q in queues) for name, queues in replies.items()}

    got = wait_until(lambda: (c := consumed()) and a.nodename in c and b.nodename in c and c,
                     timeout=10, what="both workers to answer")
    assert got[a.nodename] == [qa] and got[b.nodename] == [qb]
    by_job = {e["name"]: e["pid"] for e in attempts(r, run)}
    assert by_job["a"] != by_job["b"]


def test_a_worker_that_missed_the_broadcast_converges(app_module, run, r, roger, worker):
    queue = f"q-{run}"
    worker()
    roger.store.pause(queue, None)  # stored, but no broadcast
    job = app_module.fragile.delay(run, "a")
    time.sleep(1.5)
    assert attempts(r, run) == []
    roger.store.resume(queue)  # no broadcast either; the held job waits as due
    assert job.get(timeout=10) == "a"
