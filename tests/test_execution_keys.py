"""Execution keys: one job per key at a time, cluster-wide (SPEC section 4), real workers."""

from __future__ import annotations

import os
import time
from dataclasses import replace

import pytest

from celery_roger import DuplicateJob, Roger
from celery_roger.runtime import runtime
from celery_roger.store import Store
from celery_roger.testing import RedisServer

from .conftest import assert_serial, events, timeline, wait_until

POOLS = ["prefork", "threads"]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("pool", POOLS)
def test_jobs_sharing_a_key_run_strictly_serially(app_module, run, r, worker, pool):
    """Roger unique_execution_test: start1 stop1 start2 stop2 start3 stop3 on default:10."""
    worker(pool=pool, concurrency=10)
    for name in ("1", "2", "3"):
        app_module.step.apply_async((run, name, 0.1), execution_key=f"{run}:a")
        time.sleep(0.001)
    wait_until(lambda: len(events(r, run, "stop")) == 3, timeout=30, what="three jobs")
    assert assert_serial(timeline(r, run)) == ["1", "2", "3"]


@pytest.mark.parametrize("pool", POOLS)
def test_fifo_per_key_with_concurrency_4(app_module, run, r, worker, pool):
    worker(pool=pool, concurrency=4)
    names = [str(i) for i in range(12)]
    for name in names:
        app_module.serial.delay(run, name, 0.05)
    wait_until(lambda: len(events(r, run, "stop")) == 12, timeout=60, what="twelve jobs")
    assert assert_serial(timeline(r, run)) == names
    store = runtime(app_module.app).store
    wait_until(lambda: store.execution_key_holder(f"{run}:serial") is None, timeout=5,
               what="the key to be released after the last job")


def test_parked_jobs_do_not_block_unkeyed_jobs(app_module, run, r, worker):
    worker(concurrency=2)
    key = f"{run}:busy"
    app_module.step.apply_async((run, "holder", 3.0), execution_key=key)
    wait_until(lambda: events(r, run, "start"), timeout=20, what="the holder to start")
    for i in range(5):
        app_module.step.apply_async((run, f"parked{i}"), execution_key=key)
    for i in range(6):
        app_module.step.delay(run, f"free{i}", 0.1)
    wait_until(lambda: len(events(r, run, "stop")) == 12, timeout=60, what="all jobs")
    stops = {e["name"]: e["t"] for e in events(r, run, "stop")}
    starts = {e["name"]: e["t"] for e in events(r, run, "start")}
    assert all(stops[f"free{i}"] < stops["holder"] for i in range(6)), \
        "unkeyed jobs must run while the key's holder runs and others are parked"
    assert all(starts[f"parked{i}"] >= stops["holder"] for i in range(5))


def test_options_survive_parking_and_promotion(app_module, run, r, worker):
    worker()
    key = f"{run}:opts"
    app_module.step.apply_async((run, "holder", 1.0), execution_key=key)
    app_module.describe.apply_async(
        (run, "parked"), execution_key=key, headers={"custom": "kept"}, expires=300,
        time_limit=60, soft_time_limit=50, priority=3,
        link=app_module.plain.si(run, "linked"))
    wait_until(lambda: events(r, run, "plain"), timeout=30, what="the linked task")
    seen = events(r, run, "describe")[0]
    assert seen["custom"] == "kept"
    assert seen["timelimit"] == [60, 50]
    assert seen["expires"] != "None"
    assert seen["routing_key"] == f"q-{run}"
    assert events(r, run, "stop")[0]["t"] <= seen["t"], "the parked job ran after the holder"


@pytest.mark.parametrize("pool", POOLS)
def test_both_keys_on_one_job(app_module, run, r, worker, pool):
    """Roger crashes on this; here the parked job keeps its queue key until it has run."""
    worker(pool=pool)
    store = runtime(app_module.app).store
    ekey, qkey = f"{run}:e", f"{run}:q"
    app_module.step.apply_async((run, "holder", 1.5), execution_key=ekey)
    wait_until(lambda: events(r, run, "start"), timeout=20, what="the holder to start")
    parked = app_module.step.apply_async((run, "both"), execution_key=ekey, queue_key=qkey)
    wait_until(lambda: store.parked_ids(ekey) == [parked.id], timeout=10, what="parking")
    with pytest.raises(DuplicateJob) as info:
        app_module.step.apply_async((run, "again"), queue_key=qkey)
    assert info.value.existing_id == parked.id
    assert parked.get(timeout=30) == "both"
    wait_until(lambda: store.queue_key_holder(qkey) is None, timeout=5, what="key release")
    app_module.step.apply_async((run, "again"), queue_key=qkey).get(timeout=20)
    assert_serial(timeline(r, run))


@pytest.mark.parametrize("pool", POOLS)
def test_sigkilled_holders_key_frees_within_the_lease(app_module, run, r, worker, pool):
    lease = 3
    env = {"ROGER_TEST_LEASE": str(lease)}
    doomed = worker(env=env, pool=pool)
    key = f"{run}:k"
    holder = app_module.step.apply_async((run, "holder", 60), execution_key=key)
    holder_pid = wait_until(lambda: events(r, run, "start"), timeout=20,
                            what="the holder to start")[0]["pid"]
    worker(env=env)
    store = runtime(app_module.app).store
    nxt = app_module.step.apply_async((run, "next"), execution_key=key)
    wait_until(lambda: store.parked_ids(key) == [nxt.id], timeout=10, what="parking")

    killed_at = time.time()
    doomed.kill()
    started = wait_until(lambda: [e for e in events(r, run, "start") if e["name"] == "next"],
                         timeout=lease + 10, what="the parked job to start")[0]
    waited = started["t"] - killed_at
    print(f"key freed and next job started {waited:.2f}s after SIGKILL (lease {lease}s)")
    assert waited < lease + 4
    wait_until(lambda: not alive(holder_pid), timeout=5,
               what="the holder's pool process to die with its worker")
    # Late ack: RabbitMQ delivers the killed holder again at once, and it runs (at least
    # once) after "next"; it would sleep a minute.
    Roger(app_module.app).cancel(holder.id)


def test_holder_is_stopped_before_its_lease_ends_when_renewals_fail(
        app_module, run, r, worker, tmp_path):
    """Roger state in a Redis of its own, which goes away while a key is held."""
    lease = 5
    with RedisServer() as state:
        w = worker(env={"ROGER_TEST_LEASE": str(lease), "ROGER_TEST_STATE_URL": state.url})
        app_module.step.apply_async((run, "holder", 60), execution_key=f"{run}:k")
        pid = wait_until(lambda: events(r, run, "start"), timeout=20,
                         what="the holder to start")[0]["pid"]
        time.sleep(1.2)  # at least one renewal happened after the job started
        state.stop()
        lost_at = time.monotonic()
        wait_until(lambda: not alive(pid), timeout=lease + 2, what="the holder to be killed")
        stopped_after = time.monotonic() - lost_at
        print(f"holder killed {stopped_after:.2f}s after Redis went away (lease {lease}s)")
        assert stopped_after < lease
        assert "lost its roger lease" in w.log()
        assert not events(r, run, "stop")


def test_job_is_admitted_once_redis_is_back(app_module, run, r, worker):
    """Admission cannot reach Redis: the job waits (unacked) and runs later, never dropped."""
    with RedisServer() as state:
        worker(env={"ROGER_TEST_STATE_URL": state.url})
        state.stop()
        app_module.step.delay(run, "patient")
        time.sleep(2)
        assert not events(r, run, "start")
        state.start()
        wait_until(lambda: events(r, run, "stop"), timeout=30, what="the job to run")


def test_promotion_whose_publisher_died_is_published_by_a_worker(app_module, run, r, worker):
    worker()
    # The publish grace is the promoter's: this test plays a promoter with a 1s grace.
    store = Store(replace(runtime(app_module.app).settings, publish_grace_seconds=1))
    key = f"{run}:k"
    # A holder that is not a real job, so nothing but this test releases the key.
    store.renew("ghost-worker", registered=False)
    store.admit("ghost", instance="ghost-worker", execution_key=key,
                info={"job": "ghost", "instance": "ghost-worker"}, message={})
    parked = app_module.step.apply_async((run, "parked"), execution_key=key)
    wait_until(lambda: store.parked_ids(key) == [parked.id], timeout=10, what="parking")
    # The ghost finishes and its process dies before publishing the promoted job.
    promotion = store.finish("ghost", execution_key=key).promotion
    assert promotion is not None and promotion.job_id == parked.id
    assert parked.get(timeout=20) == "parked"
    assert store.execution_key_holder(key) in (None, parked.id)
