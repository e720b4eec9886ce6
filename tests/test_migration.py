"""Upgrading: a worker of this version moves the state an earlier celery-roger kept under
older key names (a job held for a paused queue, here) and the job runs once on resume;
beside a live worker of the earlier version it refuses to start, saying what to do."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery

from celery_roger import Roger, install

from .conftest import timeline, wait_until


def publisher(app_module: Any, redis_url: str, run: str, partition: str) -> Celery:
    app = Celery(f"migration-{run}", broker=app_module.app.conf.broker_url, backend=redis_url)
    app.conf.update(roger_redis_url=redis_url, roger_partition=partition,
                    task_default_queue=f"q-{run}",
                    broker_transport_options=app_module.app.conf.broker_transport_options)
    return install(app)


def as_an_earlier_version(roger: Roger, queue: str) -> None:
    """Rename today's keys to the names celery-roger 0.1 used, and drop the schema mark."""
    r, s, p = roger.store.redis, roger.store, roger.store.prefix
    for new, old in ((s.k_holders, p + "held"), (s.k_held_msg, p + "paused_msg"),
                     (s.k_held_queues, p + "paused_lists"),
                     (s.held_key(queue), p + f"pausedjobs:{queue}")):
        if r.exists(new):
            r.rename(new, old)
    r.delete(s.k_schema)


def test_a_job_held_by_an_earlier_version_runs_once_after_resume(app_module, run, r, worker,
                                                                  redis_url):
    partition, queue = f"mig-{run}", f"q-{run}"
    env = {"ROGER_TEST_PARTITION": partition, "ROGER_TEST_LEASE": "4"}
    app = publisher(app_module, redis_url, run, partition)
    roger = Roger(app)
    roger.pause(queue)
    job_id = f"{run}-held"
    # A job held for the paused queue, as a worker holds one (its publish entry).
    roger.store.hold(job_id, queue, {
        "task": "roger_app.fragile", "args": [run, "held"], "kwargs": {},
        "options": {"task_id": job_id, "queue": queue,
                    "headers": {"roger": {"q": queue, "ek": f"{run}:k"}}}})
    as_an_earlier_version(roger, queue)
    assert roger.store.held_count(queue) == 0, "the held job is under the older names now"

    worker_ = worker(env=env)
    assert "moved 3 keys of an earlier celery-roger" in worker_.log()
    assert roger.store.held_count(queue) == 1
    assert roger.resume(queue) == 1
    assert app.AsyncResult(job_id).get(timeout=30) == "held"
    assert [e["n"] for e in timeline(r, run) if e["event"] == "done"] == [1]
    wait_until(lambda: roger.store.execution_key_holder(f"{run}:k") is None, timeout=20,
               what="the execution key to be released")


def test_a_worker_refuses_to_start_beside_a_live_worker_of_an_earlier_version(
        app_module, run, worker, redis_url):
    partition = f"mig-{run}"
    roger = Roger(publisher(app_module, redis_url, run, partition))
    roger.store.redis.zadd(roger.store.k_workers, {"old-host/4242/abcdef01": 10**13})
    with pytest.raises(RuntimeError) as exited:
        worker(env={"ROGER_TEST_PARTITION": partition, "ROGER_TEST_LEASE": "2"})
    message = str(exited.value)
    assert "workers of an earlier celery-roger are running (old-host/4242/abcdef01)" in message
    assert "stop them, then start this worker" in message
