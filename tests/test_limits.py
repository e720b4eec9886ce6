"""Issue 16's limits on real workers: when a queue key goes (``queue_key_until``)."""

from __future__ import annotations

import time

import pytest

from celery_roger import DuplicateJob, Roger

from .conftest import wait_until


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
