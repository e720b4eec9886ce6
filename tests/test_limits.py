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
    jobs = [app_module.step.apply_async((run, f"j{i}", 1.5), execution_key=key)
            for i in range(4)]
    roger = Roger(app_module.app)
    wait_until(lambda: len(roger.store.parked_ids(key)) == 3, timeout=20, what="3 parked")
    proc = subprocess.run([sys.executable, "-m", "celery", "-A", "roger_app", "roger",
                           "limit", "execution", key, "3"], cwd=APPS,
                          env=cli_env(redis_url, run), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "started 2 parked job(s)" in proc.stdout, proc.stdout
    assert roger.info()["limits"]["execution"] == {key: 3}
    for job in jobs:
        job.get(timeout=30)
    assert most_at_once(timeline(r, run)) == 3, "the two parked ones ran beside the first"
    roger.set_limit("execution", key, None)
    assert roger.info()["limits"]["execution"] == {}
