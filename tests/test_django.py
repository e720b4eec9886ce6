"""Roger under Django (issue 15.3): a RogerTask keeps Django's task class, its
``delay_on_commit`` refuses a duplicate at call time and publishes on commit, and settings
errors name the setting as written in Django's settings. Real processes: the project in
tests/django_project (sqlite in a temporary file, Celery configured from Django's settings
with ``namespace="CELERY"``) and a real ``celery worker`` of it."""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis

from celery_roger import DuplicateJob, RogerTask
from celery_roger.testing import WorkerProcess

from .conftest import delete_queues, timeline, wait_until

PROJECT = Path(__file__).parent / "django_project"


class RolledBack(Exception):
    pass


@pytest.fixture(scope="module")
def dj(redis_url: str, broker_url: str, tmp_path_factory: pytest.TempPathFactory
       ) -> Iterator[SimpleNamespace]:
    """The Django project in this process (its app, its task, its database)."""
    queue = f"dj-{uuid.uuid4().hex[:8]}"
    env = {"ROGER_DJANGO_REDIS_URL": redis_url, "ROGER_DJANGO_BROKER": broker_url,
           "ROGER_DJANGO_DB": str(tmp_path_factory.mktemp("django") / "db.sqlite3"),
           "ROGER_DJANGO_QUEUE": queue}
    saved = {k: os.environ.get(k) for k in [*env, "DJANGO_SETTINGS_MODULE"]}
    os.environ.update(env, DJANGO_SETTINGS_MODULE="djproj.settings")
    sys.path.insert(0, str(PROJECT))
    try:
        import django
        django.setup()
        from django.db import connection, transaction
        from djproj.celery import app
        from orders.tasks import ship
    finally:
        # Celery apps made later in this session are no Django apps.
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE orders_order (id integer PRIMARY KEY, name text)")
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT), os.environ.get("PYTHONPATH", "")])
    yield SimpleNamespace(app=app, ship=ship, transaction=transaction, connection=connection,
                          env=env, queue=queue)
    app.close()
    delete_queues(app, [queue])


@pytest.fixture(scope="module")
def dj_worker(dj: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[WorkerProcess]:
    w = WorkerProcess("djproj", queues=[dj.queue], cwd=str(PROJECT), env=dj.env,
                      log_dir=str(tmp_path_factory.mktemp("django-worker")))
    w.start(timeout=60)
    yield w
    w.stop()


@pytest.fixture
def run() -> str:
    return uuid.uuid4().hex[:10]


def insert(dj: SimpleNamespace, order_id: int, name: str) -> None:
    with dj.connection.cursor() as cursor:
        cursor.execute("INSERT INTO orders_order (id, name) VALUES (%s, %s)", [order_id, name])


def when_free(dj: SimpleNamespace, run: str, order_id: int, *, timeout: float = 10) -> Any:
    """``delay_on_commit`` once the queue key is free (a job releases it just after its
    result is stored)."""

    def publish() -> Any:
        try:
            return dj.ship.delay_on_commit(run, order_id)
        except DuplicateJob:
            return None

    return wait_until(publish, timeout=timeout, what=f"queue key of order {order_id} to free",
                      interval=0.1)


def shipped(r: redis.Redis, run: str) -> list[dict[str, Any]]:
    return [e for e in timeline(r, run) if e["event"] == "ship"]


def test_a_delay_on_commit_publishes_after_the_commit(dj, dj_worker, r, run):
    with dj.transaction.atomic():
        insert(dj, 1, "first")
        result = dj.ship.delay_on_commit(run, 1)
        assert result.id  # the job's id, chosen at call time
        time.sleep(1.5)  # a worker is idle: a job published now would have run
        assert shipped(r, run) == [], "published before the commit"
    # It ran after the commit: it read the row the transaction wrote.
    assert result.get(timeout=30) == "first"
    assert [e["id"] for e in shipped(r, run)] == [result.id]
    # Published with the key taken at call time, confirmed, and released at its end.
    again = when_free(dj, run, 1)
    assert again.get(timeout=30) == "first"


def test_b_a_duplicate_raises_at_call_time_inside_the_block(dj, dj_worker, r, run):
    with dj.transaction.atomic():
        first = dj.ship.delay_on_commit(run, 2, duration=1.5)
        with pytest.raises(DuplicateJob) as refused:
            dj.ship.delay_on_commit(run, 2)
        assert refused.value.existing_id == first.id
        assert refused.value.queue_key == f"ship:{run}:2"
        existing = dj.ship.apply_async_on_commit((run, 2), on_duplicate="existing")
        assert existing.id == first.id
        insert(dj, 2, "second")  # the transaction goes on, and commits
    # Pending or running: a call outside a transaction is refused the same way.
    with pytest.raises(DuplicateJob):
        dj.ship.delay_on_commit(run, 2)
    assert first.get(timeout=30) == "second"
    assert [e["id"] for e in shipped(r, run)] == [first.id]
    # Autocommit: Django runs the hook at once, the job is published before the call returns.
    later = when_free(dj, run, 2)
    assert later.get(timeout=30) == "second"
    assert [e["id"] for e in shipped(r, run)] == [first.id, later.id]


def test_c_a_rollback_publishes_nothing_and_the_key_frees_after_the_grace(dj, dj_worker, r,
                                                                          run):
    grace = dj.app.conf.roger_publish_grace_seconds
    assert grace == 3
    with pytest.raises(RolledBack), dj.transaction.atomic():
        rolled = dj.ship.delay_on_commit(run, 3)
        taken = time.monotonic()
        raise RolledBack
    # The key stays pending for the rolled-back job until the grace ends.
    with pytest.raises(DuplicateJob) as refused:
        dj.ship.delay_on_commit(run, 3)
    assert refused.value.existing_id == rolled.id
    later = when_free(dj, run, 3, timeout=grace + 10)
    assert time.monotonic() - taken > grace - 0.5
    assert later.get(timeout=30) is None  # no order 3: the transaction rolled back
    assert [e["id"] for e in shipped(r, run)] == [later.id]  # the rolled-back job never ran


def test_d_the_task_is_a_django_task_with_rogers_behaviour(dj, dj_worker, r, run):
    from celery.contrib.django.task import DjangoTask

    task = dj.ship._get_current_object()
    assert isinstance(task, DjangoTask) and isinstance(task, RogerTask)
    assert dj.app.task_cls == "celery.contrib.django.task:DjangoTask"
    mro = [c.__name__ for c in type(task).__mro__]
    assert mro == ["ship", "RogerTask", "RogerOnCommit", "DjangoTask", "Task", "object"]
    # Roger's publish: the queue key refuses a second plain delay.
    first = dj.ship.delay(run, 4, duration=1.0)
    with pytest.raises(DuplicateJob):
        dj.ship.delay(run, 4)
    keyless = dj.ship.apply_async((run, 4), queue_key=None)  # per-call keys win
    assert keyless.get(timeout=30) is None and first.get(timeout=30) is None
    assert sorted(e["id"] for e in shipped(r, run)) == sorted([first.id, keyless.id])


def test_d_a_plain_app_is_unchanged(monkeypatch):
    from celery import Celery, Task

    monkeypatch.delenv("DJANGO_SETTINGS_MODULE", raising=False)
    app = Celery("plain", set_as_current=False)

    @app.task(base=RogerTask, queue_key="k")
    def plain() -> None: ...

    task = plain._get_current_object()
    assert type(task).__mro__[1:] == (RogerTask, Task, object)
    assert not hasattr(task, "delay_on_commit")


def test_e_a_bad_setting_stops_the_worker_naming_it_as_written(dj, tmp_path):
    env = {**dj.env, "ROGER_DJANGO_SETTINGS": json.dumps({"CELERY_ROGER_RETRY_LEVELS": "abc"})}
    w = WorkerProcess("djproj", queues=[dj.queue], cwd=str(PROJECT), env=env,
                      log_dir=str(tmp_path), name=f"bad-{uuid.uuid4().hex[:6]}@%h")
    try:
        with pytest.raises(RuntimeError, match="worker exited"):
            w.start(timeout=60)
        assert w.process is not None and w.process.returncode != 0
        log = w.log()
        assert "Unrecoverable error: ConfigurationError" in log, log[-3000:]
        assert "CELERY_ROGER_RETRY_LEVELS must be a list of seconds, got 'abc'" in log, \
            log[-3000:]
        assert "roger_retry_levels must" not in log  # (the traceback quotes the source)
        assert " ready." not in log
    finally:
        w.stop()
