"""Issue 16's limits on real workers: when a queue key goes (``queue_key_until``)."""

from __future__ import annotations

import time

import pytest

from celery_roger import DuplicateJob, Roger

from .conftest import events, timeline, wait_until


def test_queue_key_until_start_accepts_a_new_publish_once_the_job_runs(app_module, run,
                                                                      worker):
    roger = Roger(app_module.app)
    fragile = app_module.fragile
    key = f"{run}:digest"
    first = fragile.apply_async((run, "first", "sleep", 3.0), queue_key=key,
                                queue_key_until="start")
    with pytest.raises(DuplicateJob) as refused:
        fragile.apply_async((run, "early"), queue_key=key, queue_key_until="start")
    assert refused.value.existing_id == first.id, "held while it waits to start"
    worker(concurrency=1)
    wait_until(lambda: roger.job(first.id)["state"] == "running", timeout=20,
               what="the first job running")
    # It runs: its key is free, so the next publish is accepted and waits (one slot).
    second = fragile.apply_async((run, "second"), queue_key=key, queue_key_until="start")
    with pytest.raises(DuplicateJob) as again:
        fragile.apply_async((run, "third"), queue_key=key, queue_key_until="start")
    assert again.value.existing_id == second.id, "the waiting one holds it now"
    assert first.get(timeout=20) == "first" and second.get(timeout=20) == "second"
    assert roger.store.queue_key_holder(key) is None, "nothing left held"


def test_queue_key_until_start_with_an_execution_key(app_module, run, worker):
    """Admitted through admit.lua (the job has an execution key): released as it runs,
    held while it is parked."""
    roger = Roger(app_module.app)
    fragile = app_module.fragile
    ek, qk = f"{run}:ek", f"{run}:qk"
    worker(concurrency=2)
    holder = fragile.apply_async((run, "holder", "sleep", 3.0), execution_key=ek)
    wait_until(lambda: roger.job(holder.id)["state"] == "running", timeout=20,
               what="the execution key's holder running")
    parked = fragile.apply_async((run, "parked"), execution_key=ek, queue_key=qk,
                                 queue_key_until="start")
    wait_until(lambda: roger.job(parked.id)["state"] == "parked", timeout=20, what="parked")
    with pytest.raises(DuplicateJob):
        fragile.apply_async((run, "refused"), queue_key=qk, queue_key_until="start")
    assert parked.get(timeout=20) == "parked"
    accepted = fragile.apply_async((run, "after"), queue_key=qk, queue_key_until="start")
    assert accepted.get(timeout=20) == "after"


def test_a_throttle_window_refuses_publishes_after_the_job_ended(app_module, run, worker):
    fragile = app_module.fragile
    key = f"{run}:throttle"
    window = 4.0
    worker(concurrency=1)
    published = time.monotonic()
    first = fragile.apply_async((run, "first"), queue_key=key, queue_key_until=window)
    assert first.get(timeout=20) == "first"
    assert time.monotonic() - published < window - 1, "the job ended well inside the window"
    with pytest.raises(DuplicateJob) as refused:
        fragile.apply_async((run, "inside"), queue_key=key, queue_key_until=window)
    assert refused.value.existing_id == first.id
    # Once the window has passed, a publish is accepted (and runs once).
    second = wait_until(lambda: _publish_or_none(fragile, run, key, window),
                        timeout=window + 5, what="the window to end")
    assert time.monotonic() - published >= window - 0.05, "not before the window ended"
    assert second.get(timeout=20) == "second"


def _publish_or_none(task, run, key, window):
    try:
        return task.apply_async((run, "second"), queue_key=key, queue_key_until=window)
    except DuplicateJob:
        time.sleep(0.1)
        return None


def test_a_bad_queue_key_until_per_call_publishes_nothing(app_module, run):
    with pytest.raises(ValueError, match="queue_key_until must be"):
        app_module.fragile.apply_async((run, "x"), queue_key=f"{run}:k", queue_key_until=0)
    assert Roger(app_module.app).store.queue_key_holder(f"{run}:k") is None


# -- execution_limit ------------------------------------------------------------------------


def most_at_once(entries: list[dict]) -> int:
    """The most jobs running at once, from the timeline's start/stop order."""
    running, most = 0, 0
    for e in entries:
        running += 1 if e["event"] == "start" else -1 if e["event"] == "stop" else 0
        most = max(most, running)
    return most


def test_execution_limit_3_runs_at_most_three_at_once_in_fifo_order(app_module, run, r,
                                                                    worker):
    key = f"{run}:tenant"
    names = [f"j{i:02d}" for i in range(30)]
    jobs = [app_module.step.apply_async((run, name, 0.3), execution_key=key,
                                        execution_limit=3) for name in names]
    store = Roger(app_module.app).store
    # Each worker has more pool processes than the key has slots, so a job handed a slot
    # never waits for a pool process (its start would then lag behind later ones).
    worker(pool="prefork", concurrency=4)
    # All 30 reach one worker first (parked jobs are acked at once): one arrival order.
    wait_until(lambda: len(store.parked_ids(key)) >= 27 - len(events(r, run, "stop")),
               timeout=30, what="the burst admitted by the first worker")
    worker(pool="threads", concurrency=4)
    for job in jobs:
        job.get(timeout=60)
    entries = timeline(r, run)
    assert most_at_once(entries) == 3, "three at once, never more"
    starts = [e for e in entries if e["event"] == "start"]
    order = [e["name"] for e in starts]
    assert sorted(order) == names
    at = {e["name"]: e["t"] for e in starts}
    # FIFO: a job never starts before one published ahead of it, except by the few ms
    # between two promoted jobs that different workers picked up at once.
    late = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]
            if at[b] < at[a] - 0.1]
    assert not late, f"started out of order: {late[:5]}"
    assert {e["pid"] for e in starts} and len({e["pid"] for e in starts}) > 1
    wait_until(lambda: store.execution_key_holder(key) is None, timeout=5,
               what="every slot released")
    assert not store.redis.hlen(store.k_slots), "no slot record left"


def test_a_sigkilled_worker_frees_its_slots_within_the_lease(app_module, run, r, worker):
    lease = 3
    env = {"ROGER_TEST_LEASE": str(lease)}
    key = f"{run}:k"
    doomed = worker(env=env, pool="prefork", concurrency=2)
    holders = [app_module.step.apply_async((run, f"h{i}", 60), execution_key=key,
                                           execution_limit=2) for i in range(2)]
    wait_until(lambda: len(events(r, run, "start")) == 2, timeout=20,
               what="both slots taken")
    worker(env=env)
    store = Roger(app_module.app).store
    waiting = [app_module.step.apply_async((run, f"w{i}"), execution_key=key,
                                           execution_limit=2) for i in range(2)]
    wait_until(lambda: store.parked_ids(key) == [j.id for j in waiting], timeout=10,
               what="parking behind the full key")
    view = Roger(app_module.app).job(waiting[1].id)
    assert view["state"] == "parked" and view["limit"] == 2, view
    assert sorted(view["holders"]) == sorted(j.id for j in holders), view
    assert view["explanation"].startswith(
        f"parked: 2 of 2 slots of execution key {key!r} are held, by jobs "), view
    assert "position 2 of 2 in line" in view["explanation"], view
    keys = Roger(app_module.app).info()["execution_keys"]["keys"]
    assert sorted((k["key"], k["slot"]) for k in keys if k["key"] == key) == \
        [(key, 1), (key, 2)], keys
    killed_at = time.time()
    doomed.kill()
    for job in waiting:
        assert job.get(timeout=lease + 15) is not None
    started = [e["t"] for e in events(r, run, "start") if e["name"].startswith("w")]
    assert max(started) - killed_at < lease + 4, "both slots freed within the lease"
    for job in holders:  # RabbitMQ redelivers them at once (late ack): stop them
        Roger(app_module.app).cancel(job.id)


def test_a_bad_execution_limit_publishes_nothing(app_module, run):
    for bad, error in ((0, ValueError), (True, TypeError), (2.5, TypeError)):
        with pytest.raises(error, match="execution_limit must be an int >= 1"):
            app_module.step.apply_async((run, "x"), execution_key=f"{run}:k",
                                        execution_limit=bad)


def test_a_live_limit_from_the_cli_starts_parked_jobs_at_once(app_module, run, r, worker,
                                                              redis_url):
    import subprocess
    import sys

    from .conftest import APPS
    from .test_inspection import cli_env

    key = f"{run}:incident"
    worker(concurrency=4)
    # (4 s: the first job still runs when the CLI, a new process, sets the limit, even on a
    # loaded machine; were it done, it would have handed its slot on first)
    jobs = [app_module.step.apply_async((run, f"j{i}", 4.0), execution_key=key)
            for i in range(4)]
    roger = Roger(app_module.app)
    wait_until(lambda: len(roger.store.parked_ids(key)) == 3, timeout=20, what="3 parked")
    proc = subprocess.run([sys.executable, "-m", "celery", "-A", "roger_app", "roger",
                           "limit", "execution", key, "3"], cwd=APPS,
                          env=cli_env(redis_url, run), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "started 2 parked job(s)" in proc.stdout, proc.stdout
    assert roger.info()["limits"]["execution"].get(key) == 3  # (other tests' keys aside)
    for job in jobs:
        job.get(timeout=30)
    assert most_at_once(timeline(r, run)) == 3, "the two parked ones ran beside the first"
    roger.set_limit("execution", key, None)
    assert key not in roger.info()["limits"]["execution"]


# -- rate / rate_key ---------------------------------------------------------------------------


def most_in_a_window(times: list[float], window: float) -> int:
    """The most of ``times`` in any half-open interval [t, t + window)."""
    times = sorted(times)
    return max((sum(1 for u in times[i:] if u < t + window) for i, t in enumerate(times)),
               default=0)


def test_rate_5_per_second_across_two_workers(app_module, run, r, worker):
    key = f"{run}:stripe"
    worker(pool="prefork", concurrency=4)
    worker(pool="threads", concurrency=4)
    began = time.time()
    jobs = [app_module.paced.apply_async((run, f"r{i:02d}", 0.05), rate="5/s", rate_key=key)
            for i in range(40)]
    # Jobs of another key (and none) are not held back by this one's line.
    others = [app_module.step.apply_async((run, f"o{i}", 0.05), rate="100/s",
                                          rate_key=f"{run}:other") for i in range(10)]
    others += [app_module.step.apply_async((run, f"n{i}", 0.05)) for i in range(5)]
    for job in others:
        job.get(timeout=30)
    others_done = time.time()
    for job in jobs:
        job.get(timeout=60)
    starts = [e for e in events(r, run, "start") if e["name"].startswith("r")]
    # A job starts, for its rate, when its worker admits it (its body begins a few ms
    # later, in a pool process); admitted_at is the worker's clock just after Redis's.
    times = [e["admitted"] for e in starts]
    assert all(times), starts
    assert most_in_a_window(times, 0.99) <= 5, sorted(times)
    assert max(times) - min(times) >= 6.9, "40 starts at 5/s take at least 7 s"
    assert others_done - began < 5, "the other keys' jobs ran at once"
    assert len({e["pid"] for e in starts}) > 1, "both workers started rated jobs"
    order = [e["name"] for e in sorted(starts, key=lambda e: e["admitted"])]
    # FIFO by window: the five of one window start in any order, never a window early.
    late = [n for i, n in enumerate(order) if abs(int(n[1:]) - i) >= 10]
    assert not late, f"FIFO: {order}"
    store = Roger(app_module.app).store
    assert not store.redis.llen(store.ratewait_key(key)), "nobody left on the line"
    assert store.redis.zscore(store.k_rate_due, key) is None, "the line is not due any more"


def test_a_rate_with_an_execution_key_takes_both_or_neither(app_module, run, r, worker):
    ek, rk = f"{run}:tenant", f"{run}:api"
    worker(pool="threads", concurrency=6)
    jobs = [app_module.paced.apply_async((run, f"j{i:02d}", 0.3), execution_key=ek,
                                        execution_limit=2, rate="3/s", rate_key=rk)
            for i in range(12)]
    for job in jobs:
        job.get(timeout=60)
    entries = timeline(r, run)
    assert most_at_once(entries) <= 2, "the execution limit holds"
    times = [e["admitted"] for e in entries if e["event"] == "start"]
    assert most_in_a_window(times, 0.99) <= 3, sorted(times)
    store = Roger(app_module.app).store
    wait_until(lambda: store.execution_key_holder(ek) is None, timeout=5,
               what="every slot released")
    assert not store.redis.llen(store.ratewait_key(rk))


def test_job_explains_a_wait_on_a_rate(app_module, run, worker):
    key = f"{run}:slow"
    roger = Roger(app_module.app)
    worker(concurrency=2)
    jobs = [app_module.step.apply_async((run, f"j{i}"), rate="1/m", rate_key=key)
            for i in range(3)]
    assert jobs[0].get(timeout=20) == "j0"
    view = wait_until(lambda: (v := roger.job(jobs[2].id))["state"] == "parked" and v,
                      timeout=20, what="the third waiting on the rate")
    assert view["rate_key"] == key and view["rate"] == "1/m", view
    assert view["explanation"].startswith(f"waiting for rate {key!r} 1/m: next start in "), view
    assert "position 2 of 2" in view["explanation"], view
    assert roger.cancel(jobs[1].id)
    assert jobs[1].state == "REVOKED" or wait_until(lambda: jobs[1].state == "REVOKED",
                                                    timeout=10, what="REVOKED")
    assert roger.job(jobs[2].id)["position"] == 1


def test_a_bad_rate_publishes_nothing(app_module, run):
    for bad, error in (("0/s", ValueError), ("5/d", ValueError), ("fast", ValueError),
                       (5, TypeError), ("2.5/s", ValueError)):
        with pytest.raises(error, match="rate must be"):
            app_module.step.apply_async((run, "x"), rate=bad)


def test_a_live_rate_from_the_cli_starts_waiting_jobs_at_once(app_module, run, r, worker,
                                                              redis_url):
    import subprocess
    import sys

    from .conftest import APPS
    from .test_inspection import cli_env

    key = f"{run}:throttled"
    worker(concurrency=4)
    jobs = [app_module.step.apply_async((run, f"j{i}"), rate="1/h", rate_key=key)
            for i in range(4)]
    roger = Roger(app_module.app)
    assert jobs[0].get(timeout=20) == "j0"
    wait_until(lambda: roger.store.redis.llen(roger.store.ratewait_key(key)) == 3,
               timeout=20, what="3 waiting on the rate")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "celery", "-A", "roger_app", "roger",
                               "limit", "rate", key, *args], cwd=APPS,
                              env=cli_env(redis_url, run), capture_output=True, text=True,
                              timeout=60)

    bad = cli("lots")
    assert bad.returncode != 0 and "rate must be 'N/s', 'N/m' or 'N/h'" in bad.stderr, bad
    proc = cli("100/s")
    assert proc.returncode == 0, proc.stderr
    assert "started 3 parked job(s)" in proc.stdout, proc.stdout
    assert roger.info()["limits"]["rate"] == {key: "100/s"}
    for job in jobs:
        job.get(timeout=30)
    assert cli("--clear").returncode == 0
    assert roger.info()["limits"]["rate"] == {}


# -- on_duplicate="replace" ----------------------------------------------------------------


def cancels_reported(r, run) -> list[str]:
    return [e["name"] for e in events(r, run, "cb") if e["cb"] == "on_cancel"]


def test_replace_with_a_countdown_runs_only_the_last_of_a_burst(app_module, run, r, worker):
    key = f"{run}:reindex"
    worker(concurrency=2)
    burst = [app_module.fragile.apply_async((run, f"c{i:02d}"), countdown=3, queue_key=key,
                                            on_duplicate="replace") for i in range(20)]
    store = Roger(app_module.app).store
    assert store.queue_key_holder(key) == burst[-1].id, "the newest holds the key"
    # Each replaced one is REVOKED at once, though a worker may hold it for its countdown.
    assert all(job.state == "REVOKED" for job in burst[:-1]), [j.state for j in burst]
    assert burst[-1].get(timeout=30) == "c19"
    assert [e["name"] for e in events(r, run, "attempt")] == ["c19"], "only the last ran"
    # on_cancel runs once for each, when its worker drops it at its countdown.
    wait_until(lambda: len(cancels_reported(r, run)) == 19, timeout=20,
               what="on_cancel for the 19 replaced jobs")
    assert sorted(cancels_reported(r, run)) == [f"c{i:02d}" for i in range(19)]
    wait_until(lambda: store.queue_key_holder(key) is None, timeout=5, what="key released")


def test_replace_during_a_run_leaves_exactly_one_waiting(app_module, run, r, worker):
    key = f"{run}:digest"
    roger = Roger(app_module.app)
    worker(concurrency=2)
    holder = app_module.fragile.apply_async((run, "h", "sleep", 4.0), queue_key=key,
                                            on_duplicate="replace")
    wait_until(lambda: roger.job(holder.id)["state"] == "running", timeout=20,
               what="the holder running")
    burst = [app_module.fragile.apply_async((run, f"b{i}"), queue_key=key,
                                            on_duplicate="replace") for i in range(10)]
    store = roger.store
    wait_until(lambda: len(cancels_reported(r, run)) == 9, timeout=20,
               what="the nine older waiting jobs replaced")
    assert store.redis.lrange(store.qkwait_key(key), 0, -1) == [burst[-1].id.encode()], \
        "exactly one waits: the newest"
    assert roger.job(holder.id)["state"] == "running", "the running holder keeps running"
    view = roger.job(burst[-1].id)
    assert view["state"] == "parked" and view["holder"] == holder.id, view
    assert view["explanation"].startswith(f"waiting for queue key {key!r}: running job "), view
    assert holder.get(timeout=20) == "h"
    assert burst[-1].get(timeout=20) == "b9"
    attempts = [e["name"] for e in events(r, run, "attempt")]
    assert attempts == ["h", "b9"], attempts
    entries = timeline(r, run)
    h_done = next(e["t"] for e in entries if e["event"] == "done" and e["name"] == "h")
    b9_start = next(e["t"] for e in entries if e["event"] == "attempt" and e["name"] == "b9")
    assert b9_start >= h_done, "the waiting job ran after the holder, never beside it"
    assert all(job.state == "REVOKED" for job in burst[:-1])
    wait_until(lambda: store.queue_key_holder(key) is None, timeout=5,
               what="the key released after the last one (result stored first)")
    assert not store.redis.llen(store.qkwait_key(key))


def test_replace_with_a_throttle_window_is_refused(app_module, run):
    with pytest.raises(ValueError, match="on_duplicate='replace' cannot be combined"):
        app_module.fragile.apply_async((run, "x"), queue_key=f"{run}:k", queue_key_until=5,
                                       on_duplicate="replace")


def test_replace_never_loses_both(app_module, run, redis_url):
    """A replacing publish that fails leaves the holder its key, uncancelled."""
    from celery import Celery

    from celery_roger import RogerTask

    from .conftest import delete_queues, on_redis_broker

    key, queue = f"{run}:k", f"nobody-{run}"
    holder = app_module.fragile.apply_async((run, "h"), queue_key=key, queue=queue)
    down = "redis://127.0.0.1:9/0" if on_redis_broker() else "amqp://guest:guest@127.0.0.1:9//"
    app = Celery("down-replace", broker=down)
    app.conf.update(roger_redis_url=redis_url, roger_partition="test",
                    task_publish_retry=False, broker_connection_retry=False,
                    broker_connection_timeout=1)

    @app.task(base=RogerTask, name="down.replacing", shared=False)
    def job():
        return 1

    with pytest.raises(Exception) as info:
        job.apply_async(queue_key=key, on_duplicate="replace")
    assert not isinstance(info.value, DuplicateJob)
    store = Roger(app_module.app).store
    assert store.queue_key_holder(key) == holder.id, "the key went back to the holder"
    assert not store.is_cancelled(holder.id), "the holder was not cancelled"
    Roger(app_module.app).cancel(holder.id)
    delete_queues(app_module.app, [queue])


def test_a_publisher_dying_mid_replace_gives_the_key_back(app_module, run, worker):
    key, queue = f"{run}:k", f"nobody-{run}"
    worker()  # its tick heals what the dead publisher left
    holder = app_module.fragile.apply_async((run, "h"), queue_key=key, queue=queue)
    store = Roger(app_module.app).store
    # A publisher (grace 0.5 s) takes the key over, then dies before sending.
    outcome = store._run("replace_take", dict(qkey=key, job="ghost", grace_ms=500))
    assert [o.decode() for o in outcome] == ["replacing", holder.id]
    assert store.queue_key_holder(key) == "ghost"
    wait_until(lambda: store.queue_key_holder(key) == holder.id, timeout=15,
               what="the displaced holder given its key back after the grace")
    assert not store.is_cancelled(holder.id)
    with pytest.raises(DuplicateJob):
        app_module.fragile.apply_async((run, "again"), queue_key=key)
    Roger(app_module.app).cancel(holder.id)
    from .conftest import delete_queues
    delete_queues(app_module.app, [queue])
