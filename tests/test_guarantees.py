"""Issue 12: roger's guarantees hold under the faults that broke them.

One test per reproduced case, each on real ``celery worker`` processes and a real Redis:
a slow or exiting callback, a stalled broker, a lease lost to a Redis outage, poisoned
values in roger's Redis, and a message lost in flight. Each asserts what a user relies
on: never two holders of one execution key, nothing lost, no key stuck.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import pytest
import redis
from celery import Celery

from celery_roger import Roger, install
from celery_roger.testing import RedisServer

from .conftest import broker_depth, events, timeline, wait_until


def attempts(r: redis.Redis, run: str, name: str) -> list[dict[str, Any]]:
    return [e for e in timeline(r, run) if e["event"] == "attempt" and e["name"] == name]


def callbacks(r: redis.Redis, run: str, cb: str, name: str | None = None) -> list[dict]:
    return [e for e in events(r, run, "cb") if e["cb"] == cb and name in (None, e["name"])]


def index(entries: list[dict[str, Any]], event: str, name: str) -> int:
    for i, e in enumerate(entries):
        if e["event"] == event and e.get("name") == name:
            return i
    raise AssertionError(f"no {event} of {name} in {entries}")


def assert_after(r: redis.Redis, run: str, first: str, then: str) -> None:
    """``then`` started only after ``first`` ended (the timeline is one Redis list)."""
    entries = timeline(r, run)
    assert index(entries, "done", first) < index(entries, "attempt", then), (
        f"{then} started while {first} still held the execution key: {entries}")


def holder_and_parked(app_module: Any, r: redis.Redis, store: Any, run: str, key: str, *,
                      duration: float, parked: str, **options: Any) -> tuple[Any, Any]:
    """A holder of ``key`` running for ``duration`` s, and a job named ``parked`` parked
    behind it (published with ``options``)."""
    holder = app_module.fragile.apply_async((run, "holder", "sleep", duration),
                                            execution_key=key)
    wait_until(lambda: attempts(r, run, "holder"), timeout=20, what="the holder to run")
    job = app_module.fragile.apply_async((run, parked), execution_key=key, **options)
    wait_until(lambda: store.parked_ids(key) == [job.id], timeout=20, what="parking")
    return holder, job


def state_view(url: str) -> Roger:
    app = Celery("guarantees-view", broker=url, backend=url)
    app.conf.update(roger_redis_url=url, roger_partition="test")
    return Roger(app)


def instance_of(roger: Roger, job_id: str) -> str:
    raw = roger.store.redis.hget(roger.store.k_running, job_id)
    assert raw, f"job {job_id} is not recorded as running"
    return json.loads(raw)["instance"]


def lease_left(roger: Roger, instance: str) -> float:
    """What is left of a worker's lease, in ms of Redis's clock (-1: none)."""
    client = roger.store.redis
    deadline = client.zscore(roger.store.k_workers, instance)
    seconds, micros = client.time()
    return -1.0 if deadline is None else deadline - (seconds * 1000 + micros / 1000)


# -- 1. a slow or exiting callback ------------------------------------------------------------


@pytest.mark.parametrize("on_cancel", ["sleep9", "exit"])
def test_slow_or_exiting_callback_never_lets_two_jobs_of_a_key_run(app_module, run, r, worker,
                                                                   on_cancel):
    """An on_cancel longer than the lease, or one raising SystemExit, runs off the lease
    thread: the holder keeps its key (no false WorkerCrashed), the parked job runs after."""
    env = {"ROGER_TEST_LEASE": "4", "ROGER_TEST_CALLBACKS": "fault_callbacks.Faulty",
           "ROGER_TEST_ON_CANCEL": on_cancel}
    first = worker(env=env, concurrency=3)
    key = f"{run}:k"
    holder = app_module.fragile.apply_async((run, "holder", "sleep", 14), execution_key=key)
    victim = app_module.fragile.apply_async((run, "victim", "sleep", 30))
    wait_until(lambda: attempts(r, run, "holder") and attempts(r, run, "victim"), timeout=20,
               what="the holder and the victim to run on the first worker")
    worker(env=env)  # a second worker, which would take the first for dead
    roger = Roger(app_module.app)
    nxt = app_module.fragile.apply_async((run, "next"), execution_key=key)
    wait_until(lambda: roger.store.parked_ids(key) == [nxt.id], timeout=20, what="parking")
    roger.cancel(victim.id)
    wait_until(lambda: callbacks(r, run, "on_cancel", "victim"), timeout=20,
               what="on_cancel of the victim")
    assert nxt.get(timeout=60) == "next"
    assert holder.get(timeout=10) == "holder"
    assert_after(r, run, "holder", "next")
    assert not callbacks(r, run, "on_error"), callbacks(r, run, "on_error")
    if on_cancel == "exit":
        assert "SystemExit" in first.log()


# -- 2. a stalled broker ------------------------------------------------------------------------


@pytest.mark.redis_broker("it stalls a Redis broker")
def test_broker_stall_never_lets_the_lease_lapse(app_module, run, r, worker, redis_url):
    """The broker stops answering for longer than the lease while a retry is due: the
    publish waits, the lease does not; the holder keeps its key and nothing is lost."""
    with RedisServer() as broker:
        env = {"ROGER_TEST_LEASE": "4", "ROGER_TEST_BROKER": broker.url}
        worker(env=env)
        publisher = Celery("stall-publisher", broker=broker.url, backend=redis_url)
        publisher.conf.update(roger_redis_url=redis_url, roger_partition="test",
                              task_default_queue=f"q-{run}")
        install(publisher)
        key = f"{run}:k"
        holder = publisher.send_task("roger_app.fragile", (run, "holder", "sleep", 16),
                                     execution_key=key)
        wait_until(lambda: attempts(r, run, "holder"), timeout=20, what="the holder to run")
        roger = Roger(app_module.app)
        instance = instance_of(roger, holder.id)
        retried = publisher.send_task("roger_app.retrying", (run, "retried", "fail1"))
        wait_until(lambda: callbacks(r, run, "on_error", "retried"), timeout=20,
                   what="the first attempt's failure (its retry is due in 1 s)")
        assert broker.process is not None
        broker.process.send_signal(signal.SIGSTOP)
        try:
            lowest = min_lease_for(roger, instance, seconds=9)
        finally:
            broker.process.send_signal(signal.SIGCONT)
        assert lowest > 0, f"the worker's lease lapsed during the broker stall ({lowest} ms)"
        assert retried.get(timeout=30) == "retried"
        assert holder.get(timeout=30) == "holder"
        assert not callbacks(r, run, "on_error", "holder")


def min_lease_for(roger: Roger, instance: str, *, seconds: float) -> float:
    """The least that was left of ``instance``'s lease over ``seconds``, in ms."""
    lowest = float("inf")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        lowest = min(lowest, lease_left(roger, instance))
        time.sleep(0.1)
    return lowest


# -- 3. a lease lost to an outage ---------------------------------------------------------------


def test_job_stopped_with_a_lost_lease_is_a_crash_not_a_cancel(app_module, run, r, worker,
                                                               redis_url):
    """Roger's Redis stalls past the lease: the worker stops its keyed jobs. A retryable
    one runs again; another fails with on_error(WorkerCrashed); neither is REVOKED, nor
    recorded as cancelled."""
    with RedisServer() as state:
        env = {"ROGER_TEST_LEASE": "4", "ROGER_TEST_STATE_URL": state.url}
        worker(env=env)
        publisher = Celery("lease-publisher", broker=app_module.app.conf.broker_url,
                           backend=redis_url)
        publisher.conf.update(roger_redis_url=state.url, roger_partition="test",
                              task_default_queue=f"q-{run}",
                              broker_transport_options=app_module.app.conf
                              .broker_transport_options)
        install(publisher)
        failing = publisher.send_task("roger_app.fragile", (run, "failing", "sleep", 30),
                                      execution_key=f"{run}:a")
        retried = publisher.send_task("roger_app.retrying", (run, "retried", "sleep1", 30),
                                      execution_key=f"{run}:b")
        wait_until(lambda: attempts(r, run, "failing") and attempts(r, run, "retried"),
                   timeout=20, what="both jobs to run")
        assert state.process is not None
        state.process.send_signal(signal.SIGSTOP)
        try:
            wait_until(lambda: callbacks(r, run, "on_error", "failing"), timeout=30,
                       what="on_error of the job stopped with the lease")
        finally:
            state.process.send_signal(signal.SIGCONT)
        (report,) = callbacks(r, run, "on_error", "failing")
        assert report["error"] == "WorkerCrashed", report
        assert "lease" in report["message"], report
        assert publisher.AsyncResult(failing.id).state == "FAILURE"
        assert retried.get(timeout=90) == "retried"
        assert len(attempts(r, run, "retried")) == 2
        view = state_view(state.url)
        for job in (failing, retried):
            assert view.store.redis.zscore(view.store.k_cancelled, job.id) is None, (
                f"job {job.id} was recorded as cancelled")
        wait_until(lambda: not view.store.redis.hlen(view.store.k_holders), timeout=30,
                   what="no execution key held")


def test_a_lost_lease_never_kills_the_job_a_pool_process_took_up_next(app_module, run, r,
                                                                      worker):
    """A keyed job ends and its pool process takes up the next job; the worker, its pool
    with it, is stopped past its lease before it forgot the first job. The kill meant for
    the first job must not hit the second (found by the chaos soak, seed 921556060): it
    ends as it would have, never REVOKED, never recorded as cancelled."""
    w = worker(concurrency=1, env={"ROGER_TEST_LEASE": "2"})
    roger = Roger(app_module.app)
    # Three rounds: on SIGCONT the worker's healing thread may forget the first job before
    # its lease thread stops the jobs (then nothing is killed); each round is a fresh try.
    for i in range(3):
        app_module.fragile.apply_async((run, f"first{i}"), execution_key=f"{run}:k")
        second = app_module.fragile.apply_async((run, f"second{i}", "sleep", 4))
        wait_until(lambda i=i: attempts(r, run, f"second{i}"), timeout=20,
                   what="the second job to start")
        os.killpg(w.pid, signal.SIGSTOP)
        try:
            time.sleep(3.0)  # past the 2 s lease: on SIGCONT the worker stops its roger jobs
        finally:
            os.killpg(w.pid, signal.SIGCONT)
        assert second.get(timeout=30) == f"second{i}", "the job running next was killed"
        assert [e["n"] for e in timeline(r, run) if e["event"] == "done"
                and e["name"] == f"second{i}"] == [1]
        assert roger.store.redis.zscore(roger.store.k_cancelled, second.id) is None, (
            "the job running next was recorded as cancelled")


# -- 4. poisoned values ---------------------------------------------------------------------------


def test_a_key_of_the_wrong_type_is_quarantined_and_stops_nothing(app_module, run, r, worker):
    """A string at ``cancel_reports`` (a list): the tick moves it aside and goes on; the
    worker's running job is not killed; the quarantine names the key."""
    worker(env={"ROGER_TEST_LEASE": "4"})
    roger = Roger(app_module.app)
    store = roger.store
    job = app_module.fragile.apply_async((run, "long", "sleep", 8), execution_key=f"{run}:k")
    wait_until(lambda: attempts(r, run, "long"), timeout=20, what="the job to run")
    store.redis.set(store.k_cancel_reports, "garbage")
    try:
        assert job.get(timeout=30) == "long"
        assert len(attempts(r, run, "long")) == 1
        quarantined = store.quarantined()
        assert store.k_cancel_reports in quarantined, quarantined
        assert quarantined[store.k_cancel_reports]["type"] == "string"
        assert store.redis.type(store.k_cancel_reports) in (b"none", b"list")
        assert app_module.fragile.apply_async((run, "after")).get(timeout=20) == "after"
    finally:
        if store.redis.type(store.k_cancel_reports) == b"string":
            store.redis.delete(store.k_cancel_reports)


def test_unreadable_values_never_stop_a_worker(app_module, run, r, worker):
    """A non-JSON pause record, invalid UTF-8 in a dead worker's running record, and a
    parked message that is not JSON: the worker starts, the queue stays paused, the dead
    worker's record is moved aside, and the line behind the bad message moves on."""
    roger = Roger(app_module.app)
    store = roger.store
    paused_queue = f"q-{run}-paused"
    store.redis.hset(store.k_paused, paused_queue, "not json")
    store.redis.zadd(store.k_workers, {f"dead-{run}": 0})
    store.redis.hset(store.k_running, f"{run}-ghost",
                     b'{"job": "ghost", "instance": "dead-' + run.encode() + b'\xff\xfe"}')
    store.redis.hset(store.k_running, f"{run}-ghost2", b"\xff\xfe not json")
    try:
        w = worker(env={"ROGER_TEST_LEASE": "4"})
        assert paused_queue in store.paused(), "the queue must stay paused"
        key = f"{run}:k"
        holder = app_module.fragile.apply_async((run, "holder", "sleep", 3), execution_key=key)
        wait_until(lambda: attempts(r, run, "holder"), timeout=20, what="the holder to run")
        bad = app_module.fragile.apply_async((run, "bad"), execution_key=key)
        good = app_module.fragile.apply_async((run, "good"), execution_key=key)
        wait_until(lambda: store.parked_ids(key) == [bad.id, good.id], timeout=20,
                   what="two parked jobs")
        store.redis.hset(store.k_msg, bad.id, "{not json")
        assert holder.get(timeout=20) == "holder"
        assert good.get(timeout=20) == "good"
        quarantined = store.quarantined()
        assert f"{store.k_msg}#{bad.id}" in quarantined, quarantined
        assert f"{store.k_running}#{run}-ghost2" in quarantined, quarantined
        wait_until(lambda: f"{store.k_running}#{run}-ghost" in store.quarantined(),
                   timeout=10, what="the record with invalid UTF-8 to be moved aside")
        assert f"{store.k_paused}#{paused_queue}" in quarantined, quarantined
        assert w.is_alive()
        assert "quarantined" in w.log()
        assert app_module.fragile.apply_async((run, "after")).get(timeout=20) == "after"
    finally:
        store.redis.hdel(store.k_paused, paused_queue)
        store.redis.hdel(store.k_running, f"{run}-ghost", f"{run}-ghost2")
        store.redis.zrem(store.k_workers, f"dead-{run}")


# -- 5. a message lost in flight --------------------------------------------------------------


@pytest.mark.redis_broker("kombu's Redis transport loses a message popped by a killed worker")
def test_queue_key_of_a_job_lost_in_flight_is_released(app_module, run, r, worker):
    """A worker stopped in its BRPOP takes the message off the queue and is killed before
    recording it as unacked: the job is gone. Its queue key is released (ERROR log, a
    counter), so the next publish with that key is accepted."""
    settings = json.dumps({"roger_orphaned_key_seconds": 2,
                           "broker_transport_options": {"polling_interval": 30}})
    doomed = worker(env={"ROGER_TEST_SETTINGS": settings})
    queue = f"q-{run}"
    qk = f"{run}:qk"
    time.sleep(1.0)  # the worker is waiting in its BRPOP
    os.kill(doomed.pid, signal.SIGSTOP)
    lost = app_module.fragile.apply_async((run, "lost"), queue_key=qk)
    wait_until(lambda: broker_depth(app_module.app, queue) == 0, timeout=10,
               what="the stopped worker's BRPOP to take the message")
    os.killpg(doomed.pid, signal.SIGKILL)
    doomed.process.wait(10)
    store = Roger(app_module.app).store
    assert store.queue_key_holder(qk) == lost.id
    sweeper = worker(env={"ROGER_TEST_SETTINGS": settings})
    wait_until(lambda: store.queue_key_holder(qk) is None, timeout=30,
               what="the lost job's queue key to be released")
    assert f"Released queue key '{qk}'" in sweeper.log()
    assert int(store.redis.hget(store.k_stats, "orphaned_keys") or 0) >= 1
    again = app_module.fragile.apply_async((run, "again"), queue_key=qk)
    assert again.get(timeout=20) == "again"


@pytest.mark.redis_broker("kombu's Redis transport loses a message popped by a killed worker")
def test_a_promoted_job_lost_in_flight_is_published_again(app_module, run, r, worker):
    """The promoted job's message is taken by a worker stopped in its BRPOP, which is then
    killed: the execution key is not stuck with a holder that will never come; the job
    is published again from its kept message and runs."""
    settings = json.dumps({"roger_orphaned_key_seconds": 2,
                           "broker_transport_options": {"polling_interval": 30}})
    env = {"ROGER_TEST_SETTINGS": settings}
    first, second = f"q-{run}", f"q-{run}-b"
    keeper = worker(env=env, queues=[first])
    doomed = worker(env=env, queues=[second])
    key = f"{run}:k"
    store = Roger(app_module.app).store
    holder = app_module.fragile.apply_async((run, "holder", "sleep", 2), execution_key=key,
                                            queue=first)
    wait_until(lambda: attempts(r, run, "holder"), timeout=20, what="the holder to run")
    # Parked by the first worker (it consumes `second` only to admit it), promoted later
    # to `second`, where the doomed worker waits in its BRPOP.
    promoted = app_module.fragile.apply_async((run, "promoted"), execution_key=key,
                                              queue=second)
    wait_until(lambda: store.parked_ids(key) == [promoted.id], timeout=20, what="parking")
    os.kill(doomed.pid, signal.SIGSTOP)
    assert holder.get(timeout=20) == "holder"
    wait_until(lambda: store.execution_key_holder(key) == promoted.id
               and store.redis.zscore(store.k_promoting, promoted.id) is None
               and broker_depth(app_module.app, second) == 0, timeout=20,
               what="the promoted job's message to be taken by the stopped worker")
    os.killpg(doomed.pid, signal.SIGKILL)
    doomed.process.wait(10)
    rescuer = worker(env=env, queues=[second])
    assert promoted.get(timeout=40) == "promoted"
    # logged by whichever worker swept
    assert "its message was lost in flight; it is published again" in \
        keeper.log() + rescuer.log()
    wait_until(lambda: store.execution_key_holder(key) is None, timeout=10,
               what="the execution key to be free")


@pytest.mark.redis_broker("a Redis broker drops an unroutable message silently")
def test_queue_key_of_an_unroutable_job_is_released_at_publish(app_module, run, caplog):
    """A keyed job sent to an exchange that routes nowhere is dropped by the broker: its
    queue key is released at publish, with an ERROR naming the route."""
    qk = f"{run}:unroutable"
    with caplog.at_level("ERROR", logger="celery_roger"):
        app_module.fragile.apply_async((run, "nowhere"), queue_key=qk,
                                       exchange=f"{run}-nowhere", routing_key="nowhere")
    assert Roger(app_module.app).store.queue_key_holder(qk) is None
    assert "routed it to no queue" in caplog.text
    # A routable publish with that key is accepted and keeps it.
    kept = app_module.fragile.apply_async((run, "somewhere"), queue_key=qk)
    assert Roger(app_module.app).store.queue_key_holder(qk) == kept.id


# -- 7. smaller cases ---------------------------------------------------------------------------


def test_a_parked_job_that_expires_leaves_nothing_behind(app_module, run, r, worker):
    """A parked job whose expiry passes while it waits is revoked when its turn comes: its
    stored message goes, the key moves on, and it is no longer counted as parked."""
    worker()
    key = f"{run}:k"
    roger = Roger(app_module.app)
    store = roger.store
    holder, doomed = holder_and_parked(app_module, r, store, run, key, duration=3,
                                       parked="doomed", expires=1)
    assert holder.get(timeout=20) == "holder"
    wait_until(lambda: app_module.app.AsyncResult(doomed.id).state == "REVOKED", timeout=20,
               what="the expired job to be revoked")
    wait_until(lambda: store.redis.hget(store.k_msg, doomed.id) is None
               and store.redis.zscore(store.k_promoting, doomed.id) is None, timeout=10,
               what="the expired job's stored message to go")
    assert store.execution_key_holder(key) is None
    assert roger.job(doomed.id)["state"] != "parked"
    assert not attempts(r, run, "doomed")


def test_release_key_restarts_a_line_whose_holder_record_was_deleted(app_module, run, r,
                                                                      worker):
    """An operator deleted ``held`` by hand: the parked line is stranded until
    ``release_key("execution", key)``, which starts its next job."""
    worker()
    key = f"{run}:k"
    roger = Roger(app_module.app)
    store = roger.store
    holder, parked = holder_and_parked(app_module, r, store, run, key, duration=1,
                                       parked="parked")
    store.redis.hdel(store.k_holders, key)
    assert holder.get(timeout=20) == "holder"
    assert store.parked_ids(key) == [parked.id]
    roger.release_key("execution", key)
    assert parked.get(timeout=20) == "parked"
