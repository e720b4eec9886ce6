"""What roger trusts (issue 12, point 7), with real workers and a real Redis:

* ``expires`` is read as Celery reads it (a naive datetime is UTC) before anything is taken
  or published, and a bad one is refused naming ``expires``;
* a job that raises a ``BaseException`` that is not an ``Exception`` (``asyncio``'s
  ``CancelledError``, a custom one) goes through roger's failure handling;
* a caller never gets past key validation or dedup with a ``roger`` header or ``retries``
  of its own, while Celery's own retry of a running job is published unchanged;
* a job names its partition, and a worker of another partition refuses it.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import Any

import pytest
from celery import Celery

from celery_roger import DuplicateJob, Roger, RogerTask
from celery_roger.runtime import runtime

from .conftest import CONFIRMED_PUBLISH, broker_depth, events, wait_until


def queued(app_module: Any, run: str) -> int:
    return broker_depth(app_module.app, f"q-{run}")


def cbs(r, run, name, cb=None):
    return [e for e in events(r, run, "cb") if e["name"] == name and (cb is None or e["cb"] == cb)]


def outcomes(r, run, name):
    """The callbacks that end attempts (everything but before_run), in order."""
    return [e["cb"] for e in cbs(r, run, name) if e["cb"] != "before_run"]


def attempts(r, run, name):
    return [e for e in events(r, run, "attempt") if e["name"] == name]


def final_state(app, job_id, timeout=20):
    return wait_until(lambda: (s := app.AsyncResult(job_id).state) in ("SUCCESS", "FAILURE")
                      and s, timeout=timeout, what=f"job {job_id} to end")


# -- (a) expires ---------------------------------------------------------------------------


def expiring_app(broker_url: str, redis_url: str, run: str) -> Celery:
    """A publisher whose pending queue keys free themselves after 1 s."""
    app = Celery(f"exp-{run}", broker=broker_url, backend=redis_url)
    app.conf.update(roger_redis_url=redis_url, roger_partition=f"exp-{run}",
                    roger_publish_grace_seconds=1, task_default_queue=f"q-{run}",
                    broker_transport_options=CONFIRMED_PUBLISH)

    def job() -> None:
        return None

    app.task(base=RogerTask, name=f"exp.job-{run}", queue_key="k")(job)
    return app


def utc_naive(seconds: float) -> dt.datetime:
    """A naive datetime ``seconds`` from now, in UTC (how Celery reads a naive one)."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None) + dt.timedelta(seconds=seconds)


@pytest.mark.parametrize("how", ["naive", "naive-iso", "aware-elsewhere", "seconds"])
def test_expires_as_celery_reads_it_keeps_the_queue_key_until_the_expiry(
        broker_url, redis_url, run, r, how):
    """A naive ``expires`` (UTC, as in Celery) is published without an error, and its
    queue key is held until the expiry plus the grace, not just the grace."""
    app = expiring_app(broker_url, redis_url, run)
    job = app.tasks[f"exp.job-{run}"]
    expires: Any = {
        "naive": utc_naive(30),
        "naive-iso": utc_naive(30).isoformat(),
        "aware-elsewhere": dt.datetime.now(dt.timezone(dt.timedelta(hours=5)))
        + dt.timedelta(seconds=30),
        "seconds": 30,
    }[how]
    first = job.apply_async(expires=expires)  # before: TypeError, after publishing
    store = runtime(app).store
    assert store.queue_key_holder("k") == first.id
    seconds, micros = r.time()
    deadline = r.zscore(store.k_qk_pending, "k")
    left = deadline - (seconds * 1000 + micros // 1000) if deadline is not None else None
    assert left is not None and 29_000 < left <= 31_000, left  # expiry + grace, not grace
    time.sleep(2.0)  # past the grace: the job still waits in the broker
    with pytest.raises(DuplicateJob):
        job.apply_async()
    assert broker_depth(app, f"q-{run}") == 1


BAD_EXPIRES = [
    ("tomorrow", "not an ISO 8601"),
    (dt.timedelta(seconds=5), "timedelta"),
    (float("nan"), "nan"),
    (float("inf"), "inf"),
    (1e300, "out of range"),
    (True, "bool"),
    (dt.date(2030, 1, 1), "date"),
    (object(), "object"),
]


@pytest.mark.parametrize(("value", "fragment"), BAD_EXPIRES, ids=[f for _, f in BAD_EXPIRES])
def test_a_bad_expires_is_refused_naming_it_before_anything_is_taken(
        app_module, run, value, fragment):
    for publish in (
        lambda: app_module.square.apply_async((run, 1), expires=value),  # a queue key
        lambda: app_module.step.apply_async((run, "x"), expires=value),  # none
        lambda: app_module.app.send_task("roger_app.square", (run, 1), expires=value),
    ):
        with pytest.raises(ValueError) as info:
            publish()
        text = str(info.value)
        assert "expires" in text and fragment in text, text
        assert "roger_app." in text, text
    assert queued(app_module, run) == 0
    assert Roger(app_module.app).store.queue_key_holder(f"{run}:num-1") is None


# -- (b) BaseExceptions ---------------------------------------------------------------------


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_a_base_exception_is_retried_when_retryable(app_module, run, r, worker, pool):
    worker(pool=pool)
    result = app_module.interrupted.delay(run, "c", "cancelled1")
    assert result.get(timeout=20) == "c"
    assert len(attempts(r, run, "c")) == 2
    wait_until(lambda: outcomes(r, run, "c") == ["on_error", "after_run"], timeout=10,
               what=f"on_error then after_run, got {outcomes(r, run, 'c')}")
    error = cbs(r, run, "c", "on_error")[0]
    assert error["error"] == "CancelledError" and error["message"] == "cancelled c"
    assert "CancelledError" in (error["traceback"] or "")


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_a_base_exception_fails_a_job_that_is_not_retryable(app_module, run, r, worker,
                                                              pool):
    w = worker(pool=pool)
    roger = Roger(app_module.app)
    failed = app_module.interrupted_final.delay(run, "a", "abort")
    assert final_state(app_module.app, failed.id) == "FAILURE"
    wait_until(lambda: outcomes(r, run, "a") == ["on_error"], timeout=10,
               what=f"on_error, got {outcomes(r, run, 'a')}")
    assert cbs(r, run, "a", "on_error")[0]["error"] == "Abort"
    assert len(attempts(r, run, "a")) == 1
    # Its keys are free (at once, not after the lease), and the worker goes on.
    wait_until(lambda: roger.store.queue_key_holder(f"{run}:q:a") is None
               and roger.store.execution_key_holder(f"{run}:e") is None, timeout=5,
               what="the failed job's keys to be released")
    stored = app_module.app.AsyncResult(failed.id).result
    assert type(stored).__name__ == "JobAborted" and str(stored) == "Abort: aborted a", \
        repr(stored)
    assert app_module.interrupted_final.delay(run, "b", "abort0").get(timeout=20) == "b"
    assert w.is_alive()


def test_a_base_exception_on_the_last_level_buries_the_job(app_module, run, r, worker):
    worker()
    roger = Roger(app_module.app)
    job = app_module.interrupted.delay(run, "z", "abort")
    wait_until(lambda: [b.id for b in roger.buried(f"q-{run}")] == [job.id], timeout=20,
               what="the job's burial")
    buried = roger.buried(f"q-{run}")[0]
    assert buried.error_type == "Abort" and buried.error == "Abort: aborted z"
    wait_until(lambda: outcomes(r, run, "z") == ["on_error", "on_buried"], timeout=10,
               what=f"on_error then on_buried, got {outcomes(r, run, 'z')}")
    assert final_state(app_module.app, job.id) == "FAILURE"
    # What the requeue would publish names the job's partition.
    store = roger.store
    entry = json.loads(store.redis.hget(store.prefix + "buried_msg", job.id))
    assert entry["publish"]["options"]["headers"]["roger"]["p"] == "test"


# -- (c) a caller's roger header and retries ------------------------------------------------


@pytest.mark.parametrize("given", [{"headers": {"roger": {"q": "ghost", "rc": 3}}},
                                   {"retries": 1}], ids=["roger-header", "retries"])
def test_a_callers_roger_header_or_retries_never_skips_validation_or_dedup(
        app_module, run, given):
    with pytest.raises(ValueError, match="queue_key is 5000 bytes"):
        app_module.step.apply_async((run, "x"), queue_key="k" * 5000, **given)
    with pytest.raises(TypeError, match="execution_key must be a str"):
        app_module.app.send_task("roger_app.step", (run, "y"), execution_key=5, **given)
    assert queued(app_module, run) == 0
    first = app_module.square.delay(run, 1)
    with pytest.raises(DuplicateJob) as info:
        app_module.square.apply_async((run, 1), **given)
    assert info.value.existing_id == first.id
    with pytest.raises(DuplicateJob):
        app_module.app.send_task("roger_app.square", (run, 1), **given)
    assert queued(app_module, run) == 1


def test_a_callers_roger_header_is_replaced_by_roger_s_own(app_module, run, r, worker,
                                                          caplog):
    """The job runs with the header roger computed: its real queue, no forged execution
    key or retry count (which would otherwise be parked counts and keys of nothing)."""
    worker()
    forged = {"q": "ghost", "ek": f"{run}:ghost", "qk": f"{run}:ghost-q", "rc": 7, "at": 1.0}
    with caplog.at_level("WARNING", logger="celery_roger"):
        result = app_module.fragile.apply_async((run, "f"), headers={"roger": forged})
    assert result.get(timeout=20) == "f"
    before = cbs(r, run, "f", "before_run")[0]
    assert (before["queue"], before["ek"], before["qk"], before["rc"]) == \
        (f"q-{run}", None, None, 0)
    assert before["queued_at"] > time.time() - 60
    roger = Roger(app_module.app)
    assert roger.store.execution_key_holder(f"{run}:ghost") is None
    assert roger.info()["queues"].get("ghost", {}).get("parked", 0) == 0
    assert "headers['roger'] given by the caller is ignored" in caplog.text


def test_celerys_own_retry_is_published_unchanged(app_module, run, r, worker):
    """``self.retry()`` (here through ``autoretry_for``) from inside a running job keeps
    the job's roger header as published: its per-call queue key and publish time."""
    worker()
    roger = Roger(app_module.app)
    result = app_module.celery_retry.apply_async((run, "cr", "fail1"), queue_key=f"{run}:cr")
    assert result.get(timeout=20) == "cr"
    runs = cbs(r, run, "cr", "before_run")
    assert len(runs) == 2
    assert [e["qk"] for e in runs] == [f"{run}:cr"] * 2
    assert runs[0]["queued_at"] == runs[1]["queued_at"]
    wait_until(lambda: roger.store.queue_key_holder(f"{run}:cr") is None, timeout=10,
               what="the queue key to be released")


# -- (d) partitions ---------------------------------------------------------------------------


def test_a_worker_of_another_partition_refuses_the_job_and_frees_its_keys(
        app_module, run, r, worker):
    app = app_module.app
    roger = Roger(app)
    other = f"other-{run}"
    w = worker(env={"ROGER_TEST_PARTITION": other})
    keyed = app_module.keyed.delay(run, "k")  # both keys: admitted in the event loop
    square = app_module.square.delay(run, 3)  # a queue key only
    plain = app_module.step.delay(run, "s")  # no key
    for job in (keyed, square, plain):
        assert final_state(app, job.id) == "FAILURE"
        error = app.AsyncResult(job.id).result
        assert type(error).__name__ == "WrongPartition", repr(error)
        assert "'test'" in str(error) and repr(other) in str(error), str(error)
    assert attempts(r, run, "k") == [] and events(r, run, "square") == [] \
        and events(r, run, "start") == []
    # Released in the job's own partition: the same jobs can be published again at once.
    wait_until(lambda: roger.store.queue_key_holder(f"{run}:q:k") is None
               and roger.store.queue_key_holder(f"{run}:num-3") is None
               and roger.store.execution_key_holder(f"{run}:e") is None, timeout=10,
               what="the refused jobs' keys to be released")
    app_module.keyed.delay(run, "k")
    app_module.square.delay(run, 3)
    # A job without the partition field (an older publisher) runs as before.
    send = runtime(app).original_send_task
    legacy = send("roger_app.fragile", (run, "legacy"), headers={"roger": {"q": f"q-{run}"}})
    assert legacy.get(timeout=20) == "legacy"
    log = w.log()
    assert f"published in roger partition 'test', refused by a worker of partition " \
        f"{other!r}" in log, log[-3000:]
    assert w.is_alive()


def test_a_partition_field_of_the_wrong_type_is_ignored(app_module, run, r, worker):
    w = worker()
    send = runtime(app_module.app).original_send_task
    result = send("roger_app.fragile", (run, "p"), headers={"roger": {"q": f"q-{run}", "p": 5}})
    assert result.get(timeout=20) == "p"
    assert "fields of the wrong type: p=5" in w.log()
