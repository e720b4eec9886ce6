"""Operating roger: beat, purging parked jobs, shutting workers down."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from celery_roger import Roger
from celery_roger.runtime import runtime

from .conftest import APPS, broker_depth, events, wait_until


def test_beat_sending_a_keyed_task_every_tick_is_quiet(app_module, run, redis_url, tmp_path):
    """celery beat sends a task with a queue key and on_duplicate="existing" every 0.2s:
    one message is queued, and beat logs no error."""
    queue = f"q-{run}"
    log = tmp_path / "beat.log"
    env = {**os.environ, "ROGER_TEST_REDIS_URL": redis_url, "ROGER_TEST_BEAT": "1",
           "ROGER_TEST_QUEUE": queue, "ROGER_TEST_PARTITION": f"beat-{run}",
           "PYTHONPATH": str(APPS)}
    with open(log, "wb") as out:
        beat = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "roger_app", "beat", "-l", "INFO",
             "-s", str(tmp_path / "schedule")], cwd=APPS, env=env, stdout=out,
            stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: log.read_text().count("Sending due task") >= 8, timeout=30,
                       what="beat to send eight times")
        finally:
            beat.terminate()
            beat.wait(10)
    text = log.read_text()
    assert "Error" not in text and "Traceback" not in text, text
    assert broker_depth(app_module.app, queue) == 1, "only the first tick may publish"


def test_purge_queue_drops_parked_jobs_and_releases_their_keys(app_module, run, r, worker):
    worker()
    store = runtime(app_module.app).store
    key = f"{run}:k"
    holder = app_module.step.apply_async((run, "holder", 2.0), execution_key=key)
    wait_until(lambda: events(r, run, "start"), timeout=20, what="the holder to start")
    parked = [app_module.step.apply_async((run, f"p{i}"), execution_key=key,
                                          queue_key=f"{run}:q{i}") for i in range(3)]
    wait_until(lambda: len(store.parked_ids(key)) == 3, timeout=10, what="parking")
    assert Roger(app_module.app).purge_queue(f"q-{run}") == 3
    assert store.parked_ids(key) == []
    for i in range(3):
        assert store.queue_key_holder(f"{run}:q{i}") is None
    holder.get(timeout=20)
    wait_until(lambda: store.execution_key_holder(key) is None, timeout=5,
               what="the key to be free (nothing parked behind it)")
    time.sleep(0.5)
    assert [e["name"] for e in events(r, run, "start")] == ["holder"], \
        f"purged jobs must never run; parked were {[p.id for p in parked]}"


def test_warm_shutdown_ends_the_workers_lease(app_module, run, r, worker):
    w = worker()
    store = runtime(app_module.app).store
    app_module.step.delay(run, "one").get(timeout=20)
    instances = {m.decode() for m in r.zrange(store.k_workers, 0, -1)}
    mine = [i for i in instances if i.startswith(w.nodename + "/")]
    assert len(mine) == 1, instances
    w.stop()
    assert r.zscore(store.k_workers, mine[0]) in (None, 0.0), "lease must end at shutdown"


def test_parked_job_that_expired_hands_its_key_on(app_module, run, r, worker):
    """Celery discards an expired job at receipt; its turn passes to the next in line."""
    worker()
    store = runtime(app_module.app).store
    key = f"{run}:k"
    app_module.step.apply_async((run, "holder", 2.0), execution_key=key)
    wait_until(lambda: events(r, run, "start"), timeout=20, what="the holder to start")
    expired = app_module.step.apply_async((run, "expired"), execution_key=key, expires=1,
                                          queue_key=f"{run}:q")
    last = app_module.step.apply_async((run, "last"), execution_key=key)
    wait_until(lambda: len(store.parked_ids(key)) == 2, timeout=10, what="parking")
    assert last.get(timeout=30) == "last"
    assert expired.state == "REVOKED"
    assert [e["name"] for e in events(r, run, "start")] == ["holder", "last"]
    assert store.queue_key_holder(f"{run}:q") is None


def test_an_expiring_job_never_leaves_its_queue_key_stuck(app_module, run, r, worker):
    """A broker may drop an expired message unseen (RabbitMQ with a queue TTL policy): its
    queue key then frees itself at expiry plus the publish grace, and a job that reaches a
    worker in time keeps its key for as long as it runs."""
    from dataclasses import replace

    from celery_roger.runtime import runtime
    from celery_roger.store import Store

    rt = runtime(app_module.app)
    original = rt.store
    rt._store = Store(replace(original.settings, publish_grace_seconds=1))
    try:
        expired = app_module.square.apply_async((run, 1), expires=0.5)
        running = app_module.square.apply_async((run, 2), expires=0.5)
    finally:
        rt._store = original
    store = rt.store
    assert store.queue_key_holder(f"{run}:num-1") == expired.id
    time.sleep(2)  # past expiry + grace, before any worker saw the jobs
    worker()  # its tick frees the key of a job the broker dropped; Celery revokes the rest
    wait_until(lambda: store.queue_key_holder(f"{run}:num-1") is None, timeout=10,
               what="the expired job's queue key to be freed")
    wait_until(lambda: store.queue_key_holder(f"{run}:num-2") is None, timeout=10,
               what="the second key to be freed")
    assert app_module.square.apply_async((run, 1)).get(timeout=20) == 1
    assert running.state in ("PENDING", "REVOKED")
