"""Coming from celery-once / celery-singleton (issue 15): ``queue_key=True`` and
``keys.args(...)`` key a job on its task's name and its arguments, bound through the
task's signature; ``roger_on_duplicate`` sets ``on_duplicate`` app-wide. Against a real
broker (RabbitMQ too, with ROGER_TEST_BROKER) and a real worker."""

from __future__ import annotations

import importlib
import json
import os
import uuid
from typing import Any

import pytest
from celery import Celery

from celery_roger import DuplicateJob
from celery_roger.runtime import runtime
from celery_roger.testing import WorkerProcess

from .conftest import APPS, CONFIRMED_PUBLISH, broker_depth, wait_until

#: The worker of these tests also imports the tasks of tests/apps/migration_keys_app.py.
IMPORTS = {"ROGER_TEST_SETTINGS": json.dumps({"imports": ["migration_keys_app"]})}


@pytest.fixture
def tasks(app_module: Any) -> Any:
    """tests/apps/migration_keys_app, its tasks on the test app."""
    return importlib.import_module("migration_keys_app")


def queued(app_module: Any, run: str) -> int:
    return broker_depth(app_module.app, f"q-{run}")


def test_same_arguments_bound_by_signature_are_one_job(app_module, tasks, run, worker):
    first = tasks.total.delay(run, 1, 2)
    key = f'migration_keys_app.total:{{"run":"{run}","a":1,"b":2}}'
    for args, kwargs in (((run, 1), {"b": 2}), ((), {"run": run, "a": 1, "b": 2}),
                         ((run, 1, 2), {})):
        with pytest.raises(DuplicateJob) as info:
            tasks.total.apply_async(args, kwargs)
        assert info.value.queue_key == key
        assert info.value.existing_id == first.id
    tasks.total.delay(run, 1)  # b=0 by default: another job
    assert queued(app_module, run) == 2, "refused publishes must publish nothing"

    worker(env=IMPORTS)
    assert first.get(timeout=30) == 3
    store = runtime(app_module.app).store
    wait_until(lambda: store.queue_key_holder(key) is None, timeout=10, what="key release")
    assert tasks.total.delay(run, 1, b=2).get(timeout=30) == 3  # free again once it ran


def test_two_tasks_with_the_same_arguments_do_not_collide(app_module, tasks, run):
    tasks.total.delay(run, 5, 6)
    tasks.difference.delay(run, 5, 6)  # no DuplicateJob: the task's name is in the key
    tasks.sync.delay(run, 5)
    with pytest.raises(DuplicateJob):
        tasks.sync.delay(run, 5, full=True)  # keys.args("run", "account"): full is not in it
    with pytest.raises(DuplicateJob):
        tasks.difference.delay(run, a=5, b=6)
    assert queued(app_module, run) == 3


def test_per_call_true_and_hashed_long_values(app_module, tasks, run):
    long_text = "x" * 5000
    # Per call, on a task keyed otherwise: the key of all its arguments.
    first = tasks.sync.apply_async((run, long_text), queue_key=True)
    with pytest.raises(DuplicateJob) as info:
        tasks.sync.apply_async((), {"run": run, "account": long_text, "full": False},
                               queue_key=True)
    assert info.value.existing_id == first.id
    assert info.value.queue_key.startswith("migration_keys_app.sync:blake2b:")
    assert len(info.value.queue_key) < 100
    tasks.sync.apply_async((run, long_text + "y"), queue_key=True)  # another hash
    tasks.sync.apply_async((run, long_text), queue_key=None)  # per call: no key
    assert queued(app_module, run) == 3


def publisher(broker_url: str, redis_url: str, run: str, **conf: Any) -> Celery:
    """A process of the test partition that publishes the tasks of migration_keys_app
    (Celery adds them to every app: ``@app.task`` tasks are shared)."""
    app = Celery(f"pub-{run}", broker=broker_url, backend=redis_url)
    app.conf.update(roger_redis_url=redis_url, roger_partition="test",
                    task_default_queue=f"q-{run}", broker_transport_options=CONFIRMED_PUBLISH,
                    **conf)
    return app


def test_on_duplicate_setting_returns_the_holders_result(app_module, tasks, broker_url,
                                                         redis_url, run, worker):
    app = publisher(broker_url, redis_url, run, roger_on_duplicate="existing")
    try:
        total, strict = app.tasks["migration_keys_app.total"], app.tasks[
            "migration_keys_app.strict"]
        assert total.app is app
        first = total.delay(run, 20, 22)
        again = total.delay(run, 20, b=22)  # the task says nothing: the setting decides
        assert again.id == first.id
        with pytest.raises(DuplicateJob):  # per call wins over the setting
            total.apply_async((run, 20, 22), on_duplicate="raise")
        strict.delay(run, 7)
        with pytest.raises(DuplicateJob):  # the task's own option wins over the setting
            strict.delay(run, 7)
        assert queued(app_module, run) == 2
        worker(env=IMPORTS)
        assert again.get(timeout=30) == 42
    finally:
        app.close()


def test_on_duplicate_default_is_still_raise(app_module, tasks, run):
    assert runtime(app_module.app).settings.on_duplicate == "raise"
    tasks.total.delay(run, 3)
    with pytest.raises(DuplicateJob):
        tasks.total.delay(run, 3)
    assert tasks.total.apply_async((run, 3), on_duplicate="existing").id


def test_bad_on_duplicate_setting_stops_the_worker_at_start(app_module, run, redis_url,
                                                            tmp_path):
    queue = f"q-{run}"
    w = WorkerProcess(
        "roger_app", queues=[queue], cwd=str(APPS), log_dir=str(tmp_path),
        name=f"bad-{uuid.uuid4().hex[:6]}@%h",
        env={"ROGER_TEST_REDIS_URL": redis_url, "ROGER_TEST_QUEUE": queue,
             "ROGER_TEST_SETTINGS": json.dumps({"roger_on_duplicate": "ignore"}),
             "PYTHONPATH": os.pathsep.join([str(APPS), os.environ.get("PYTHONPATH", "")])})
    try:
        with pytest.raises(RuntimeError, match="worker exited"):
            w.start(timeout=30)
        log = w.log()
        assert "setting roger_on_duplicate must be one of ('raise', 'existing', 'replace'), got " \
               "'ignore'" in log, log[-3000:]
    finally:
        w.stop()
