"""Queue keys: dedup at publish time (SPEC section 3), against a real broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import pytest
from celery import Celery

from celery_roger import DuplicateJob, Roger, RogerTask, install
from celery_roger.runtime import runtime

from .conftest import APPS, CONFIRMED_PUBLISH, broker_depth, events, on_redis_broker, wait_until


def make_app(broker_url: str, redis_url: str, run: str, partition: str, **conf: Any) -> Celery:
    """Another app on the test broker and Redis, publishing into this run's queue."""
    app = Celery(f"app-{partition}", broker=broker_url, backend=redis_url)
    app.conf.update(roger_redis_url=redis_url, roger_partition=partition,
                    task_default_queue=f"q-{run}", broker_transport_options=CONFIRMED_PUBLISH,
                    **conf)
    return app


def queued(app_module: Any, run: str) -> int:
    """Messages waiting in this run's queue, as the broker counts them."""
    return broker_depth(app_module.app, f"q-{run}")


def test_queue_key_is_computed_from_arguments(app_module, run):
    """Roger job_test: QueueKeyJob [2] gets queue_key "num-2"."""
    assert app_module.square.roger_keys((run, 2), {}) == (f"{run}:num-2", None)


def test_second_publish_is_refused_while_first_is_queued(app_module, run):
    first = app_module.square.delay(run, 1)
    with pytest.raises(DuplicateJob) as info:
        app_module.square.delay(run, 1)
    assert info.value.queue_key == f"{run}:num-1"
    assert info.value.existing_id == first.id
    assert queued(app_module, run) == 1, "the refused publish must publish nothing"
    # another key is independent
    app_module.square.delay(run, 2)
    assert queued(app_module, run) == 2


def test_on_duplicate_existing_returns_the_queued_job(app_module, run):
    first = app_module.square.delay(run, 5)
    again = app_module.square.apply_async((run, 5), on_duplicate="existing")
    assert again.id == first.id
    assert queued(app_module, run) == 1


def test_per_call_keys_win_over_the_tasks_own(app_module, run):
    square = app_module.square
    a = square.apply_async((run, 1), queue_key=f"{run}:manual")
    with pytest.raises(DuplicateJob) as info:
        app_module.step.apply_async((run, "x"), queue_key=f"{run}:manual")
    assert info.value.existing_id == a.id
    # the task's own key for these arguments was not taken
    square.delay(run, 1)
    # a per-call None removes the task's key
    square.apply_async((run, 1), queue_key=None)
    square.apply_async((run, 1), queue_key=None)
    assert queued(app_module, run) == 4


@pytest.mark.parametrize(
    ("kind", "value", "error", "fragment"),
    [
        ("queue_key", 42, TypeError, "queue_key must be a str or None, got int"),
        ("queue_key", b"bytes", TypeError, "got bytes"),
        ("execution_key", ["a"], TypeError, "execution_key must be a str or None, got list"),
        ("queue_key", "", ValueError, "queue_key must not be an empty string"),
        ("execution_key", "é" * 513, ValueError, "execution_key is 1026 bytes of UTF-8"),
        ("queue_key", "\udcff", ValueError, "queue_key is not valid UTF-8"),
        ("execution_key", lambda *a, **k: 3.5, TypeError, "got float"),
    ],
)
def test_bad_keys_raise_naming_task_and_key_and_publish_nothing(
        app_module, run, r, kind, value, error, fragment):
    with pytest.raises(error) as info:
        app_module.step.apply_async((run, "x"), **{kind: value})
    assert "roger_app.step" in str(info.value)
    assert fragment in str(info.value)
    assert queued(app_module, run) == 0
    assert r.hlen("roger:{test}:qkeys") == 0 or not any(
        run in k.decode() for k in r.hkeys("roger:{test}:qkeys"))


def test_key_of_exactly_1024_bytes_is_accepted(app_module, run):
    app_module.step.apply_async((run, "x"), queue_key="k" * 1024)
    assert queued(app_module, run) == 1


def test_key_callable_and_method_override(broker_url, redis_url, run):
    app = make_app(broker_url, redis_url, run, f"p-{run}")

    @app.task(base=RogerTask, queue_key=lambda account, *a, **kw: f"sync:{account}",
              execution_key="accounts")
    def sync(account, full=False):
        return account

    class PerUser(RogerTask):
        def get_execution_key(self, user, **kwargs):
            return f"user:{user}"

    @app.task(base=PerUser)
    def notify(user, text=""):
        return text

    assert sync.roger_keys((42,), {"full": True}) == ("sync:42", "accounts")
    assert notify.roger_keys(("ann",), {"text": "hi"}) == (None, "user:ann")
    assert sync.acks_late is True


def test_concurrent_publishers_exactly_one_wins(app_module, run, redis_url):
    """Eight publisher processes publish the same queue key at the same instant."""
    start_at = time.time() + 2.0
    env = {**os.environ, "ROGER_TEST_REDIS_URL": redis_url, "PYTHONPATH": str(APPS),
           "ROGER_TEST_QUEUE": f"q-{run}"}
    procs = [subprocess.Popen([sys.executable, str(APPS / "publish_once.py"), run, "9",
                               str(start_at)], stdout=subprocess.PIPE, env=env)
             for _ in range(8)]
    outcomes = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    published = [o["published"] for o in outcomes if "published" in o]
    duplicates = {o["duplicate"] for o in outcomes if "duplicate" in o}
    assert len(published) == 1, outcomes
    assert duplicates == set(published), outcomes
    assert queued(app_module, run) == 1


def test_failed_broker_publish_releases_the_key(redis_url, run):
    # Nothing listens on port 9.
    down = "redis://127.0.0.1:9/0" if on_redis_broker() else "amqp://guest:guest@127.0.0.1:9//"
    app = Celery("down", broker=down)
    app.conf.update(roger_redis_url=redis_url, roger_partition=f"p-{run}",
                    task_publish_retry=False, broker_connection_retry=False,
                    broker_connection_timeout=1)

    @app.task(base=RogerTask, name="down.job")
    def job():
        return 1

    with pytest.raises(Exception) as info:
        job.apply_async(queue_key="k1")
    assert not isinstance(info.value, DuplicateJob)
    assert runtime(app).store.queue_key_holder("k1") is None, "key must be released"


def test_key_of_a_publisher_that_died_before_publishing_frees_itself(broker_url, redis_url,
                                                                    run):
    app = make_app(broker_url, redis_url, run, f"p-{run}",
                   roger_publish_grace_seconds=1)

    @app.task(base=RogerTask, name="grace.job")
    def job():
        return 1

    store = runtime(app).store
    assert store.take_queue_key("k", "ghost") is None  # the dead publisher's take
    with pytest.raises(DuplicateJob):
        job.apply_async(queue_key="k")
    time.sleep(1.2)
    result = job.apply_async(queue_key="k")
    assert store.queue_key_holder("k") == result.id


def test_send_task_by_name_honours_per_call_keys(app_module, broker_url, redis_url, run):
    """A process that only publishes by name: install(app) and per-call keys."""
    app = install(make_app(broker_url, redis_url, run, "test"))
    first = app.send_task("roger_app.step", (run, "a"), queue_key=f"{run}:by-name",
                          queue=f"q-{run}")
    with pytest.raises(DuplicateJob) as info:
        app.send_task("roger_app.step", (run, "b"), queue_key=f"{run}:by-name",
                      queue=f"q-{run}")
    assert info.value.existing_id == first.id
    existing = app.send_task("roger_app.step", (run, "c"), queue_key=f"{run}:by-name",
                             queue=f"q-{run}", on_duplicate="existing")
    assert existing.id == first.id
    assert queued(app_module, run) == 1
    with pytest.raises(TypeError, match=r"roger_app\.step: execution_key must be a str"):
        app.send_task("roger_app.step", (run, "d"), execution_key=7)


def test_partitions_do_not_see_each_others_keys(broker_url, redis_url, run):
    one = make_app(broker_url, redis_url, run, f"one-{run}")
    two = make_app(broker_url, redis_url, run, f"two-{run}")
    def job():
        return None

    for app in (one, two):
        app.task(base=RogerTask, name="part.job")(job)
    one.tasks["part.job"].apply_async(queue_key="shared")
    two.tasks["part.job"].apply_async(queue_key="shared")  # no DuplicateJob
    with pytest.raises(DuplicateJob):
        one.tasks["part.job"].apply_async(queue_key="shared")
    assert Roger(one).release_key("queue", "shared") is not None
    one.tasks["part.job"].apply_async(queue_key="shared")


def test_eager_mode_validates_keys_and_takes_none(app_module, run):
    app = app_module.app
    app.conf.task_always_eager = True
    try:
        assert app_module.square.delay(run, 4).get() == 16
        assert app_module.square.delay(run, 4).get() == 16  # no key was taken
        with pytest.raises(TypeError):
            app_module.step.apply_async((run, "x"), queue_key=1)
    finally:
        app.conf.task_always_eager = False
    assert runtime(app).store.queue_key_holder(f"{run}:num-4") is None


def test_release_key_and_bad_kind(app_module, run):
    roger = Roger(app_module.app)
    first = app_module.square.delay(run, 3)
    assert roger.release_key("queue", f"{run}:num-3") == first.id
    app_module.square.delay(run, 3)
    with pytest.raises(ValueError, match="kind must be one of"):
        roger.release_key("bogus", "x")


def test_purge_queue_removes_jobs_and_releases_their_keys(app_module, run):
    for n in range(3):
        app_module.square.delay(run, n)
    app_module.step.delay(run, "unkeyed")
    roger = Roger(app_module.app)
    assert roger.info()["queues"][f"q-{run}"]["depth"] == 4  # the broker's count
    assert roger.purge_queue(f"q-{run}") == 4
    assert queued(app_module, run) == 0
    assert roger.info()["queues"][f"q-{run}"]["depth"] == 0
    assert roger.purge_queue(f"q-{run}-never-declared") == 0
    for n in range(3):
        app_module.square.delay(run, n)  # keys were released: no DuplicateJob


def test_unique_queue_scenario(app_module, run, r, worker):
    """Roger unique_queue_test: ok, duplicate, runs; ok, 4 duplicates, runs; ok, runs."""
    worker()
    step = app_module.step
    key = f"{run}:key-job1"

    def enqueue():
        try:
            return step.apply_async((run, "job1", 0.5), queue_key=key)
        except DuplicateJob:
            return None

    store = runtime(app_module.app).store

    def finished(result):
        # The result is stored just before the keys are released (as in Roger).
        result.get(timeout=20)
        wait_until(lambda: store.queue_key_holder(key) is None, timeout=5, what="key release")

    first = enqueue()
    assert first is not None and enqueue() is None
    finished(first)
    second = enqueue()
    assert second is not None
    assert [enqueue() for _ in range(4)] == [None] * 4
    finished(second)
    third = enqueue()
    assert third is not None
    third.get(timeout=20)
    assert len(events(r, run, "start")) == 3


def test_same_job_without_queue_key_runs_twice(app_module, run, r, worker):
    """Roger enqueue_test: the same job enqueued twice without a queue key executes twice."""
    worker()
    app_module.step.apply_async((run, "twice"), task_id=f"{run}-same")
    app_module.step.apply_async((run, "twice"), task_id=f"{run}-same")
    wait_until(lambda: len(events(r, run, "stop")) == 2, timeout=20, what="two runs")


def test_job_runs_and_returns_its_result(app_module, run, worker):
    """Roger enqueue_test: MyCalculation [2] performs and gives 4."""
    worker()
    assert app_module.square.delay(run, 2).get(timeout=20) == 4
