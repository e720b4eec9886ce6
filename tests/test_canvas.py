"""Celery's canvas (chains, groups, chords) and celery beat with roger jobs, on real workers.

The behaviour tested here is described in the README, section "Canvas and beat".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from celery import chain, chord, group
from celery.exceptions import ChordError, TaskRevokedError

from celery_roger import DuplicateJob, Roger
from celery_roger.runtime import runtime

from .conftest import APPS, events, timeline, wait_until


def names(r: Any, run: str, event: str = "start") -> list[str]:
    return [e["name"] for e in events(r, run, event)]


def at(r: Any, run: str, event: str, name: str) -> int:
    """Position of (event, name) in the run's timeline."""
    entries = timeline(r, run)
    for i, e in enumerate(entries):
        if e["event"] == event and e.get("name") == name:
            return i
    pytest.fail(f"no {event} of {name} in the timeline: {entries}")


def callbacks(r: Any, run: str, cb: str) -> list[str]:
    return [e["name"] for e in events(r, run, "cb") if e["cb"] == cb]


def open_gate(r: Any, run: str, name: str) -> None:
    r.set(f"gate:{run}:{name}", 1, ex=60)


# -- execution keys: a parked link runs later, and the canvas goes on ------------------


def hold_execution_key(app_module: Any, r: Any, run: str, key: str) -> None:
    """Start a gate job named "holder" with execution key ``key``; return once it runs."""
    app_module.gate.apply_async((run, "holder"), execution_key=key)
    wait_until(lambda: "holder" in names(r, run), timeout=20, what="the holder to start")


def test_chain_link_parks_behind_a_held_execution_key_and_the_chain_goes_on(
        app_module, run, r, worker):
    """A chain link whose execution key is held parks; the rest of the chain follows it."""
    worker(concurrency=2)
    store = runtime(app_module.app).store
    key = f"{run}:ek"
    append = app_module.append
    hold_execution_key(app_module, r, run, key)
    result = chain(append.s([], run, "a"), append.s(run, "b").set(execution_key=key),
                   append.s(run, "c")).apply_async()
    b = result.parent
    wait_until(lambda: store.parked_ids(key) == [b.id], timeout=20,
               what="link b to park behind the holder")
    assert "b" not in names(r, run)
    open_gate(r, run, "holder")
    assert result.get(timeout=30) == ["a", "b", "c"]
    assert at(r, run, "stop", "holder") < at(r, run, "start", "b")
    assert at(r, run, "stop", "b") < at(r, run, "start", "c")
    wait_until(lambda: store.execution_key_holder(key) is None, timeout=10,
               what="the execution key to be released")


def test_chord_callback_parks_behind_a_held_execution_key_and_runs_later(
        app_module, run, r, worker):
    worker(concurrency=2)
    store = runtime(app_module.app).store
    key = f"{run}:ek"
    hold_execution_key(app_module, r, run, key)
    result = chord([app_module.fragile.s(run, "h1"), app_module.fragile.s(run, "h2")],
                   app_module.append.s(run, "cb").set(execution_key=key)).apply_async()
    wait_until(lambda: store.parked_ids(key) == [result.id], timeout=20,
               what="the chord callback to park behind the holder")
    open_gate(r, run, "holder")
    assert result.get(timeout=30) == ["h1", "h2", "cb"]
    assert at(r, run, "stop", "holder") < at(r, run, "start", "cb")


# -- queue keys inside a canvas --------------------------------------------------------


def test_group_member_with_a_held_queue_key_fails_with_duplicate_job(app_module, run, r,
                                                                     worker):
    """Two members with one queue key, and a member whose key an earlier job holds: the
    group is published whole; each refused member is FAILURE(DuplicateJob)."""
    store = runtime(app_module.app).store
    fragile = app_module.fragile
    earlier = fragile.apply_async((run, "earlier"), queue_key=f"{run}:q-earlier")
    members = group(
        fragile.s(run, "g1").set(queue_key=f"{run}:q1"),
        fragile.s(run, "g2").set(queue_key=f"{run}:q1"),
        fragile.s(run, "g3").set(queue_key=f"{run}:q-earlier", on_duplicate="existing"),
        fragile.s(run, "g4"),
    ).apply_async()
    g1, g2, g3, g4 = members.results
    assert g2.state == "FAILURE" and g3.state == "FAILURE"
    assert isinstance(g2.result, DuplicateJob) and g2.result.existing_id == g1.id
    assert isinstance(g3.result, DuplicateJob) and g3.result.existing_id == earlier.id
    assert g3.result.queue_key == f"{run}:q-earlier"
    assert r.llen(f"q-{run}") == 3, "earlier, g1 and g4 are queued; g2 and g3 are not"
    assert g4.state == "PENDING"
    # The first job of a chain: nothing of the chain is published, all of it fails.
    refused = chain(fragile.s(run, "x").set(queue_key=f"{run}:q1"),
                    app_module.append.s(run, "y")).apply_async()
    assert refused.state == "FAILURE" and refused.parent.state == "FAILURE"
    assert refused.result.existing_id == g1.id
    assert r.llen(f"q-{run}") == 3
    worker()
    outcome = members.get(timeout=30, propagate=False)
    assert outcome[0] == "g1" and outcome[3] == "g4"
    assert isinstance(outcome[1], DuplicateJob) and isinstance(outcome[2], DuplicateJob)
    assert earlier.get(timeout=30) == "earlier"
    assert sorted(names(r, run, "attempt")) == ["earlier", "g1", "g4"]
    for qk in (f"{run}:q1", f"{run}:q-earlier"):
        wait_until(lambda qk=qk: store.queue_key_holder(qk) is None, timeout=10,
                   what=f"queue key {qk} to be released")


def test_chord_with_a_duplicate_header_member_fails_without_running_its_callback(
        app_module, run, r, worker):
    worker()
    fragile = app_module.fragile
    result = chord([fragile.s(run, "c1").set(queue_key=f"{run}:q"),
                    fragile.s(run, "c2").set(queue_key=f"{run}:q")],
                   app_module.append.s(run, "cb")).apply_async()
    with pytest.raises(DuplicateJob) as info:
        result.get(timeout=30)  # raises the failed header member's error, as in Celery
    c1, c2 = result.parent.results
    assert info.value.existing_id == c1.id and c2.state == "FAILURE"
    # The callback's own result (the wait also ends the pending result's subscription).
    assert isinstance(result.get(timeout=10, propagate=False), ChordError)
    assert c1.get(timeout=10) == "c1"
    assert names(r, run, "attempt") == ["c1"]
    assert "cb" not in names(r, run)


@pytest.fixture
def held_queue_key(app_module, run) -> Iterator[tuple[str, str]]:
    """(queue key, job id): a job that holds a queue key, on a queue no worker consumes."""
    idle = f"q-{run}-idle"
    qk = f"{run}:held"
    job = app_module.fragile.apply_async((run, "idle"), queue_key=qk, queue=idle)
    yield qk, job.id
    Roger(app_module.app).purge_queue(idle)


def test_chain_link_with_a_held_queue_key_is_refused_and_recorded(
        app_module, run, r, worker, held_queue_key):
    """The worker publishes link b after a returns; b's queue key is held by another
    job: a stays SUCCESS, b and c are FAILURE(DuplicateJob), b's errback runs."""
    qk, holder = held_queue_key
    w = worker()
    append = app_module.append
    result = chain(append.s([], run, "a"),
                   append.s(run, "b").set(queue_key=qk,
                                          link_error=app_module.plain.si(run, "errback")),
                   append.s(run, "c")).apply_async()
    with pytest.raises(DuplicateJob) as info:
        result.get(timeout=30)
    assert info.value.existing_id == holder and info.value.queue_key == qk
    b, a = result.parent, result.parent.parent
    assert a.get(timeout=10) == ["a"], "the parent of the refused link stays SUCCESS"
    assert b.state == "FAILURE" and isinstance(b.result, DuplicateJob)
    assert result.state == "FAILURE", "c is failed with b, as Celery fails a chain's rest"
    wait_until(lambda: names(r, run, "plain") == ["errback"], timeout=10,
               what="b's errback to run")
    assert names(r, run) == ["a"]
    assert runtime(app_module.app).store.queue_key_holder(qk) == holder
    log = w.log()
    assert f"{b.id}] not published: queue key '{qk}' is held by job {holder}" in log, log
    assert "Traceback" not in log, log


def test_link_and_chord_callback_with_a_held_queue_key_are_refused_and_recorded(
        app_module, run, r, worker, held_queue_key):
    """A ``link=`` callback and a chord's callback: each is FAILURE(DuplicateJob), the
    task or header that published it SUCCESS."""
    qk, holder = held_queue_key
    worker()
    append = app_module.append
    link = append.s(run, "l").set(queue_key=qk)
    link.freeze()
    parent = app_module.fragile.apply_async((run, "p"), link=link)
    assert parent.get(timeout=30) == "p"
    refused = app_module.app.AsyncResult(link.id)
    wait_until(lambda: refused.state == "FAILURE", timeout=10, what="the link's FAILURE")
    assert isinstance(refused.result, DuplicateJob) and refused.result.existing_id == holder
    result = chord([app_module.fragile.s(run, "h1")],
                   append.s(run, "cb").set(queue_key=qk)).apply_async()
    with pytest.raises(DuplicateJob) as info:
        result.get(timeout=30)
    assert info.value.existing_id == holder
    assert result.parent.get(timeout=10) == ["h1"]
    assert names(r, run, "attempt") == ["p", "h1"]


# -- a chord whose header member is cancelled or buried --------------------------------


def test_chord_with_cancelled_members_fails_and_its_callback_never_runs(
        app_module, run, r, worker):
    """Header members cancelled while parked, while waiting for a retry, while queued in
    the broker and while running: the chord's callback is FAILURE(ChordError) and never
    runs; on_cancel fires once each."""
    worker(concurrency=3)
    store = runtime(app_module.app).store
    key = f"{run}:ek"
    fragile = app_module.fragile
    hold_execution_key(app_module, r, run, key)
    parked = fragile.s(run, "parked").set(execution_key=key, queue_key=f"{run}:qp")
    queued = fragile.s(run, "queued").set(queue=f"q-{run}-late", queue_key=f"{run}:qq")
    retried = app_module.keyed_slow_retry.s(run, "retried", "fail")  # retry after 2 s
    running = app_module.gate.s(run, "running")
    members = (parked, queued, retried, running)
    for member in members:
        member.freeze()
    result = chord([fragile.s(run, "ok"), *members],
                   app_module.append.s(run, "cb")).apply_async()
    wait_until(lambda: store.parked_ids(key) == [parked.id], timeout=20,
               what="a header member to park")
    roger = Roger(app_module.app)
    # Waiting for its retry once its failed attempt has ended (its retry is recorded a
    # moment before the attempt's end releases it as running).
    wait_until(lambda: store.retry_due_at(retried.id)
               and roger.job(retried.id)["state"] == "retrying", timeout=20,
               what="a header member to wait for its retry")
    assert roger.cancel(retried.id) == "retry", "the retry must still be waiting"
    assert roger.cancel(parked.id) == "parked"
    roger.cancel(queued.id)
    wait_until(lambda: "running" in names(r, run), timeout=20, what="a member to start")
    assert roger.cancel(running.id) == "running"
    worker(queues=[f"q-{run}-late"])
    cancelled = ["parked", "queued", "retried", "running"]
    wait_until(lambda: sorted(callbacks(r, run, "on_cancel")) == cancelled,
               timeout=20, what="on_cancel of the four cancelled members")
    with pytest.raises(TaskRevokedError):
        result.get(timeout=30)
    # The callback's own result (the wait also ends the pending result's subscription).
    assert isinstance(result.get(timeout=10, propagate=False), ChordError)
    for member in members:
        assert app_module.app.AsyncResult(member.id).state == "REVOKED"
    open_gate(r, run, "holder")
    wait_until(lambda: store.execution_key_holder(key) is None, timeout=10,
               what="the execution key to be released")
    assert store.queue_key_holder(f"{run}:qp") is None
    assert store.queue_key_holder(f"{run}:qq") is None
    assert store.queue_key_holder(f"{run}:q:retried") is None
    assert sorted(names(r, run, "attempt")) == ["ok", "retried"]
    assert "cb" not in names(r, run) and "running" not in names(r, run, "stop")
    assert sorted(callbacks(r, run, "on_cancel")) == cancelled


def test_chord_with_a_buried_member_fails_and_its_callback_never_runs(
        app_module, run, r, worker):
    """A header member is retried once, then buried: the chord's callback is
    FAILURE(ChordError) and never runs; on_buried fires once; its queue key is free."""
    worker(concurrency=2)
    store = runtime(app_module.app).store
    bad = app_module.once.s(run, "bad", "fail").set(queue_key=f"{run}:qb")
    bad.freeze()
    result = chord([app_module.fragile.s(run, "ok"), bad],
                   app_module.append.s(run, "cb")).apply_async()
    with pytest.raises(RuntimeError, match="boom bad"):
        result.get(timeout=30)
    # The callback's own result (the wait also ends the pending result's subscription).
    assert isinstance(result.get(timeout=10, propagate=False), ChordError)
    assert app_module.app.AsyncResult(bad.id).state == "FAILURE"
    assert [b.id for b in Roger(app_module.app).buried(queue=f"q-{run}")] == [bad.id]
    wait_until(lambda: callbacks(r, run, "on_buried") == ["bad"], timeout=10,
               what="on_buried of the bad member")
    assert store.queue_key_holder(f"{run}:qb") is None
    assert names(r, run, "attempt").count("bad") == 2
    assert "cb" not in names(r, run)
    assert callbacks(r, run, "on_buried") == ["bad"]


# -- celery beat -----------------------------------------------------------------------


@contextmanager
def beat(run: str, redis_url: str, tmp_path: Path, task: str, duration: float = 0.0,
         options: dict[str, Any] | None = None) -> Iterator[Path]:
    """``celery beat`` sending ``task(run, duration)`` every 0.3 s with the schedule
    entry's ``options``; yields its log file."""
    log = tmp_path / f"beat-{task}.log"
    env = {**os.environ, "ROGER_TEST_REDIS_URL": redis_url, "ROGER_TEST_QUEUE": f"q-{run}",
           "ROGER_TEST_BEAT_RUN": run, "ROGER_TEST_BEAT_TASK": task,
           "ROGER_TEST_BEAT_DURATION": str(duration),
           "ROGER_TEST_BEAT_OPTIONS": json.dumps(options or {}), "PYTHONPATH": str(APPS)}
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "roger_app", "beat", "-l", "INFO",
             "-s", str(tmp_path / f"schedule-{task}")],
            cwd=APPS, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield log
        finally:
            process.terminate()
            process.wait(10)


def sent(log: Path) -> int:
    return log.read_text().count("Sending due task")


def test_beat_with_on_duplicate_existing_absorbs_ticks_while_the_job_waits(
        app_module, run, r, worker, redis_url, tmp_path):
    """Worker stopped: one job is queued however many ticks; worker slow: runs never
    overlap and the next tick after each run publishes again."""
    with beat(run, redis_url, tmp_path, "beat_report", duration=0.5) as log:
        wait_until(lambda: sent(log) >= 5, timeout=30, what="beat to send five times")
        assert r.llen(f"q-{run}") == 1, "only the first tick publishes"
        worker(concurrency=2)
        wait_until(lambda: len(names(r, run, "stop")) >= 3, timeout=30,
                   what="three runs of the beat job")
    text = log.read_text()
    assert "Error" not in text and "Traceback" not in text, text
    starts, stops = names(r, run, "start"), names(r, run, "stop")
    assert len(set(starts)) == len(starts), "each run is a new job"
    entries = [e for e in timeline(r, run) if e["event"] in ("start", "stop")]
    for i, e in enumerate(entries):  # never two at once: start/stop alternate
        assert e["event"] == ("start" if i % 2 == 0 else "stop"), entries
    assert sent(log) > len(stops)


def test_beat_with_on_duplicate_raise_logs_each_refused_tick(
        app_module, run, r, redis_url, tmp_path):
    """Each tick refused while the job waits is logged by beat as an ERROR ("Message
    Error", with the key and the job holding it); beat goes on; one job is queued."""
    with beat(run, redis_url, tmp_path, "beat_strict") as log:
        wait_until(lambda: log.read_text().count("Message Error") >= 3, timeout=30,
                   what="beat to log three refused ticks")
    assert r.llen(f"q-{run}") == 1
    holder = runtime(app_module.app).store.queue_key_holder(f"{run}:beat-strict")
    text = log.read_text()
    assert f"queue key '{run}:beat-strict' is held by job {holder}" in text, text
    Roger(app_module.app).purge_queue(f"q-{run}")


def test_beat_entry_option_on_duplicate_existing_quietens_a_raising_task(
        app_module, run, r, redis_url, tmp_path):
    """``options={"on_duplicate": "existing"}`` in the schedule entry: quiet, one job."""
    with beat(run, redis_url, tmp_path, "beat_strict",
              options={"on_duplicate": "existing"}) as log:
        wait_until(lambda: sent(log) >= 5, timeout=30, what="beat to send five times")
    text = log.read_text()
    assert "Error" not in text and "Traceback" not in text, text
    assert r.llen(f"q-{run}") == 1
    Roger(app_module.app).purge_queue(f"q-{run}")
