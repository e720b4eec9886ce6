"""Poison-proof inspection (issue 12, point 4): garbage in roger's Redis never makes
``info()``, ``job()``, ``buried()``, the CLI, the dashboard's JSON API or ``/metrics``
raise.

Garbage: a key of the wrong type, a hash value that is not JSON, not a JSON object or not
UTF-8, fields of the wrong types, odd sorted-set scores, buried entries missing fields.
A bad hash value is moved to the quarantine (``Roger(app).quarantined()``); a key of the
wrong type reads as empty and is logged. Each test writes a small roger state by hand
(no worker runs), poisons it, and restores the whole partition afterwards (some of the
poisoned keys are shared by the partition).
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
from types import SimpleNamespace
from typing import Any

import pytest
from kombu.utils import json as kombu_json

from celery_roger import Roger, inspect

from .conftest import APPS

TASK = "roger_app.fragile"


@pytest.fixture
def roger(app_module):
    return Roger(app_module.app)


@pytest.fixture
def partition(r, roger):
    """The partition's keys as they are now, restored after the test."""
    match = roger.store.prefix + "*"
    saved = {key: (r.dump(key), r.pttl(key)) for key in r.scan_iter(match=match)}
    yield
    for key in list(r.scan_iter(match=match)):
        r.delete(key)
    for key, (dump, ttl) in saved.items():
        if dump is not None:
            r.restore(key, max(ttl, 0), dump, replace=True)


@pytest.fixture
def cli(redis_url, run):
    env = {**os.environ, "ROGER_TEST_REDIS_URL": redis_url, "ROGER_TEST_QUEUE": f"q-{run}",
           "PYTHONPATH": os.pathsep.join([str(APPS), os.environ.get("PYTHONPATH", "")])}

    def call(*args):
        proc = subprocess.run([sys.executable, "-m", "celery", "-A", "roger_app", "roger",
                               *args], cwd=APPS, env=env, capture_output=True, text=True,
                              timeout=60)
        assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
        return proc
    return call


def scene(r, store, run) -> SimpleNamespace:
    """A sound roger state, written by hand: a running job holding an execution key and a
    queue key, a job parked behind it, a retry, a buried job, a job held for a paused
    queue, a cancellation, and the counters."""
    s = SimpleNamespace(
        running=f"{run}-running", parked=f"{run}-parked", retry=f"{run}-retry",
        buried=f"{run}-buried", held=f"{run}-held", cancelled=f"{run}-cancelled",
        queue=f"q-{run}", paused=f"q-{run}-paused", ek=f"{run}:ek", qk=f"{run}:qk",
        instance=f"{run}-instance")
    now = time.time()
    header = {"q": s.queue, "at": now}
    r.zadd(store.k_workers, {s.instance: (now + 60) * 1000})
    r.hset(store.k_running, s.running, json.dumps({
        "job": s.running, "task": TASK, "instance": s.instance, "worker": "w@host", "pid": 1,
        "queue": s.queue, "ek": s.ek, "qk": s.qk, "admitted_at": now, "args": [run],
        "kwargs": {}}))
    r.hset(store.k_holders, s.ek, s.running)
    r.hset(store.k_qkeys, s.qk, s.running)
    r.rpush(store.parked_key(s.ek), s.parked)
    r.hset(store.k_msg, s.parked, json.dumps({
        "headers": {"task": TASK, "id": s.parked, "roger": {**header, "ek": s.ek}},
        "body": ""}))
    r.hincrby(store.k_parked_count, s.queue, 1)
    r.zadd(store.k_retry, {s.retry: (now + 600) * 1000})
    r.hset(store.k_retry_msg, s.retry, kombu_json.dumps({
        "task": TASK, "args": [run], "kwargs": {},
        "options": {"task_id": s.retry, "headers": {"roger": {**header, "rc": 1}}}}))
    r.zadd(store.k_buried, {s.buried: now * 1e6})
    r.zadd(store.buried_key(s.queue), {s.buried: now * 1e6})
    r.sadd(store.k_buried_queues, s.queue)
    r.hset(store.k_buried_msg, s.buried, kombu_json.dumps({
        "id": s.buried, "task": TASK, "args": [run, "b"], "kwargs": {}, "queue": s.queue,
        "queue_key": None, "execution_key": None, "retry_count": 2,
        "error": "RuntimeError: boom", "error_type": "RuntimeError", "traceback": None,
        "buried_at": now, "publish": {
            "task": TASK, "args": [run, "b"], "kwargs": {},
            "options": {"task_id": s.buried, "queue": s.queue,
                        "headers": {"roger": {**header, "rc": 3}}}}}))
    r.hincrby(store.k_buried_dropped, s.queue, 2)
    r.hset(store.k_paused, s.paused, json.dumps({"at": now, "reason": "maintenance"}))
    r.rpush(store.held_key(s.paused), s.held)
    r.sadd(store.k_held_queues, s.paused)
    r.hset(store.k_held_msg, s.held, kombu_json.dumps({
        "task": TASK, "args": [run], "kwargs": {}, "options": {"task_id": s.held},
        "queue": s.paused}))
    r.zadd(store.k_cancelled, {s.cancelled: (now + 600) * 1000})
    r.hincrby(store.k_stats, "cancelled", 1)
    return s


def read_everything(roger: Roger, s: SimpleNamespace) -> dict[str, Any]:
    """Every read path of inspection; what it returns must be strict JSON."""
    seen: dict[str, Any] = {"info": roger.info()}
    for name in ("running", "parked", "retry", "buried", "held", "cancelled"):
        seen[name] = roger.job(getattr(s, name))
    seen["buried_all"] = [vars(j) for j in roger.buried()]
    seen["buried_queue"] = [vars(j) for j in roger.buried(s.queue)]
    seen["keys"] = [roger.keys("queue"), roger.keys("execution", prefix=f"{s.ek[:-3]}")]
    seen["dropped"] = roger.buried_dropped()
    seen["paused"] = sorted(roger.paused_queues())
    seen["stats"] = roger.stats()
    seen["quarantined"] = roger.quarantined()
    json.dumps(seen, allow_nan=False)
    return seen


# -- keys of the wrong type --------------------------------------------------------------------

WRONG_TYPE_KEYS = [
    "running", "holders", "qkeys", "paused", "buried", "retry", "msg", "retry_msg",
    "buried_msg", "held_msg", "parked_count", "buried_queues", "buried_dropped",
    "cancelled", "cancel_reported", "promoting", "workers", "stats", "quarantine",
    "parked:{ek}", "buried:{queue}", "held:{paused}",
]


@pytest.mark.parametrize("name", WRONG_TYPE_KEYS)
def test_a_key_of_the_wrong_type_reads_as_empty(app_module, run, r, roger, partition,
                                                 caplog, monkeypatch, name):
    monkeypatch.setattr(inspect, "_unreadable_logged", {}, raising=False)  # once a minute
    s = scene(r, roger.store, run)
    key = roger.store.prefix + name.format(**vars(s))
    r.delete(key)
    r.set(key, "garbage")
    with caplog.at_level(logging.ERROR, logger="celery_roger"):
        seen = read_everything(roger, s)
    assert any(key in rec.getMessage() and rec.levelno == logging.ERROR
               for rec in caplog.records), [rec.getMessage() for rec in caplog.records]
    assert r.get(key) == b"garbage"  # inspection only reads: a script moves it aside
    if name == "running":
        assert seen["info"]["running"]["count"] == 0
        assert seen["running"]["state"] == "queued-or-unknown"
    if name == "buried":
        assert seen["buried_all"] == [] and [j["id"] for j in seen["buried_queue"]] == [
            s.buried]
    # The other places still read.
    if name != "running":
        assert seen["running"]["state"] == "running"
    # A requeue goes through the scripts, which move the key aside first.
    assert roger.requeue_buried(queue=s.queue, all=True) in (0, 1)
    assert roger.purge_buried() >= 0


def test_the_cli_with_keys_of_the_wrong_type(app_module, run, r, roger, partition, cli):
    s = scene(r, roger.store, run)
    for name in ("running", "holders", "qkeys", "paused", "buried", "retry", "parked_count",
                 "buried_queues", "buried_dropped", "stats", "quarantine"):
        r.delete(roger.store.prefix + name)
        r.set(roger.store.prefix + name, "garbage")
    run_the_cli(cli, s)
    assert "nothing quarantined" in cli("quarantine").stdout
    assert json.loads(cli("quarantine", "--json").stdout) == {}


def test_the_cli_with_nested_keys_of_the_wrong_type(app_module, run, r, roger, partition,
                                                    cli):
    s = scene(r, roger.store, run)
    for name in (f"parked:{s.ek}", f"buried:{s.queue}", f"held:{s.paused}", "workers",
                 "promoting", "cancel_reported", "buried_msg"):
        r.delete(roger.store.prefix + name)
        if name == "buried_msg":
            r.rpush(roger.store.prefix + name, "x")
        else:
            r.hset(roger.store.prefix + name, "x", "y")
    status = run_the_cli(cli, s)
    assert status["running"]["count"] == 1


def run_the_cli(cli, s) -> dict[str, Any]:
    assert "partition test" in cli("status").stdout
    status = json.loads(cli("status", "--json").stdout)
    cli("keys")
    json.loads(cli("keys", "--json").stdout)
    for job_id in (s.running, s.parked, s.retry, s.buried, s.held):
        cli("job", job_id)
    json.loads(cli("job", s.buried, "--json").stdout)
    cli("buried")
    json.loads(cli("buried", s.queue, "--json").stdout)
    return status


# -- hash values that are not what roger wrote ---------------------------------------------

BAD_VALUES = [
    pytest.param(b"{not json", id="not-json"),
    pytest.param(b"[1, 2]", id="a-list"),
    pytest.param(b"42", id="a-number"),
    pytest.param(b'"text"', id="a-string"),
    pytest.param(b"null", id="null"),
    pytest.param(b'{"task": "\xff\xfe"}', id="invalid-utf8-inside"),
    pytest.param(b"\xff\xfe\xfd\x00", id="invalid-utf8"),
]

#: hash → the scene's field it holds (a job id, or a queue)
JSON_HASHES = {"running": "running", "msg": "parked", "retry_msg": "retry",
               "buried_msg": "buried", "held_msg": "held", "paused": "paused"}


@pytest.mark.parametrize("hash_name", sorted(JSON_HASHES))
@pytest.mark.parametrize("bad", BAD_VALUES)
def test_an_unreadable_hash_value_is_quarantined(app_module, run, r, roger, partition,
                                                 hash_name, bad):
    s = scene(r, roger.store, run)
    key = roger.store.prefix + hash_name
    field = getattr(s, JSON_HASHES[hash_name])
    r.hset(key, field, bad)
    seen = read_everything(roger, s)
    record = roger.quarantined()[f"{key}#{field}"]
    assert record["key"] == key and record["field"] == field and record["reason"]
    assert record["value"] == bad.decode("utf-8", "replace")
    assert roger.info()["quarantined"] >= 1 and roger.stats()["quarantined"] >= 1
    if hash_name == "paused":
        # The queue stays paused; its record is replaced by one without a reason.
        assert s.paused in seen["paused"] and s.paused in roger.paused_queues()
        assert json.loads(r.hget(key, field)) == {"at": None, "reason": None}
    else:
        assert r.hget(key, field) is None  # moved aside
    if hash_name == "buried_msg":
        assert s.buried not in {b.id for b in roger.buried(limit=1000)}
        assert roger.job(s.buried)["state"] != "buried"
        assert roger.requeue_buried(s.buried) == 0
    if hash_name == "running":
        assert roger.info()["running"]["count"] == 0


@pytest.mark.parametrize("hash_name", ["parked_count", "buried_dropped", "stats"])
def test_a_counter_that_is_not_an_integer_is_quarantined(app_module, run, r, roger,
                                                         partition, hash_name):
    s = scene(r, roger.store, run)
    key = roger.store.prefix + hash_name
    field = "cancelled" if hash_name == "stats" else s.queue
    r.hset(key, field, b"\xffnot a number")
    read_everything(roger, s)
    assert f"{key}#{field}" in roger.quarantined()
    assert r.hget(key, field) is None


def test_the_cli_with_unreadable_values(app_module, run, r, roger, partition, cli):
    s = scene(r, roger.store, run)
    for hash_name, name in JSON_HASHES.items():
        r.hset(roger.store.prefix + hash_name, getattr(s, name), b"\xff{not json\n\x1b[31m")
    r.hset(roger.store.prefix + "parked_count", s.queue, "x")
    r.hset(roger.store.k_running, b"\xff\xfe-not-utf8", b"{")  # a field that is not UTF-8
    # Garbage in the quarantine itself is listed as it is.
    r.hset(roger.store.k_quarantine, f"{run}-odd", json.dumps({"at": "y", "reason": [1]}))
    r.hset(roger.store.k_quarantine, f"{run}-junk", b"\xff\n")
    run_the_cli(cli, s)
    assert r.hget(roger.store.k_running, b"\xff\xfe-not-utf8") is None
    status = json.loads(cli("status", "--json").stdout)
    assert status["quarantined"] >= len(JSON_HASHES) + 1
    assert "quarantined values:" in cli("status").stdout
    listed = json.loads(cli("quarantine", "--json").stdout)
    assert f"{roger.store.k_running}#{s.running}" in listed
    human = cli("quarantine").stdout.splitlines()
    assert human[0].split() == ["WHEN", "KEY", "REASON", "VALUE"]
    assert len(human) == len(listed) + 1  # one line each, control characters escaped
    assert any(f"{roger.store.k_running}#{s.running}" in line for line in human)


# -- fields of the wrong types, missing fields, odd scores ------------------------------------


def test_fields_of_the_wrong_types(app_module, run, r, roger, partition, cli):
    s = scene(r, roger.store, run)
    store = roger.store
    r.hset(store.k_running, s.running, json.dumps({
        "admitted_at": "x", "instance": 5, "args": 3, "kwargs": [], "task": ["t"],
        "queue": {"q": 1}, "pid": "p", "qk": 7, "ek": [], "worker": 1.5}))
    r.hset(store.k_running, f"{run}-running2", json.dumps({
        "admitted_at": 1e300, "instance": s.instance, "queue": s.queue, "task": TASK}))
    r.hset(store.k_buried_msg, s.buried, kombu_json.dumps({
        "id": 5, "args": 3, "kwargs": [1], "retry_count": "x", "buried_at": "y", "error": 5,
        "queue": [], "queue_key": 1, "task": None, "traceback": 4, "publish": 3}))
    r.zadd(store.k_buried, {f"{run}-bare": time.time() * 1e6})
    r.hset(store.k_buried_msg, f"{run}-bare", "{}")
    r.hset(store.k_retry_msg, s.retry, kombu_json.dumps({"task": 5, "options": 3}))
    r.hset(store.k_msg, s.parked, json.dumps(
        {"headers": {"task": 5, "roger": {"ek": [1], "q": 5, "qk": 3}}}))
    r.hset(store.k_held_msg, s.held, kombu_json.dumps({"queue": [1]}))
    r.hset(store.k_paused, s.paused, json.dumps({"at": "x", "reason": 5}))

    seen = read_everything(roger, s)
    (running,) = [j for j in seen["info"]["running"]["jobs"] if j["id"] == s.running]
    assert running == {"id": s.running, "task": None, "queue": "", "worker": None,
                       "pid": None, "since": None, "queue_key": None, "execution_key": None,
                       "worker_alive": False}
    assert seen["running"]["state"] == "running" and seen["running"]["since"] is None
    (entry,) = [j for j in seen["buried_all"] if j["id"] == s.buried]
    assert entry["args"] == () and entry["kwargs"] == {} and entry["retry_count"] == 0
    assert entry["task"] == "" and entry["error"] == "" and entry["buried_at"] > 0
    (bare,) = [j for j in seen["buried_all"] if j["id"] == f"{run}-bare"]
    assert bare["task"] == "" and bare["args"] == ()
    assert roger.job(f"{run}-bare")["state"] == "buried"
    assert seen["retry"]["state"] == "retrying" and seen["retry"]["task"] is None
    assert seen["parked"]["state"] == "parked" and seen["parked"]["execution_key"] is None
    assert seen["held"]["state"] == "held" and seen["held"]["queue"] is None
    queue = seen["info"]["queues"][s.paused]
    assert queue["paused"] and queue["paused_at"] is None and queue["paused_reason"] is None
    # A buried entry with nothing to publish stays buried, and the requeue says so.
    assert roger.requeue_buried(s.buried) == 0
    assert s.buried in {j.id for j in roger.buried()}
    run_the_cli(cli, s)


def test_odd_scores(app_module, run, r, roger, partition, cli):
    s = scene(r, roger.store, run)
    store = roger.store
    r.zadd(store.k_workers, {s.instance: math.inf})
    r.zadd(store.k_retry, {s.retry: math.inf, f"{run}-retry2": -math.inf})
    r.hset(store.k_retry_msg, f"{run}-retry2", r.hget(store.k_retry_msg, s.retry))
    r.zadd(store.k_buried, {f"{run}-b2": math.inf})
    r.hset(store.k_buried_msg, f"{run}-b2", kombu_json.dumps({"task": TASK, "buried_at": 1e300}))
    r.zadd(store.k_cancelled, {s.cancelled: math.inf})
    r.zadd(store.k_promoting, {s.parked: -math.inf})

    seen = read_everything(roger, s)
    assert seen["retry"]["next_run"] is None and "unreadable" in seen["retry"]["explanation"]
    assert roger.job(f"{run}-retry2")["state"] == "retrying"
    assert seen["running"]["worker_alive"] is True
    assert seen["info"]["workers"] == [{"instance": s.instance, "lease_expires": None,
                                        "alive": True}]
    assert seen["cancelled"]["cancelled"] == {"until": None, "reported": False}
    assert seen["parked"]["state"] == "promoted"
    assert {j["buried_at"] for j in seen["buried_all"] if j["id"] == f"{run}-b2"} == {0.0}
    run_the_cli(cli, s)
    cli("job", f"{run}-retry2")


# -- the dashboard's JSON API and /metrics ----------------------------------------------------


def test_the_dashboard_api_and_metrics_with_garbage(app_module, run, r, roger, partition):
    pytest.importorskip("flask")
    from celery_roger.dashboard import create_app

    s = scene(r, roger.store, run)
    store = roger.store
    r.hset(store.k_running, f"{run}-bad", json.dumps({"admitted_at": "x", "instance": 5}))
    r.hset(store.k_holders, f"{run}:ek2", f"{run}-bad")
    r.hset(store.k_running, f"{run}-unreadable", b"\xff")
    r.hset(store.k_buried_msg, s.buried, kombu_json.dumps({"args": 3}))
    r.zadd(store.k_retry, {s.retry: math.inf})
    r.delete(store.k_qkeys)
    r.set(store.k_qkeys, "garbage")
    client = create_app(roger, None).test_client()
    for path in ("/api/roger/info", f"/api/roger/jobs/{s.running}",
                 f"/api/roger/jobs/{s.retry}", f"/api/roger/jobs/{s.buried}",
                 "/api/roger/buried", "/metrics"):
        response = client.get(path, headers={"Host": "127.0.0.1"})
        assert response.status_code == 200, (path, response.get_data(as_text=True))
        if path.startswith("/api"):
            json.loads(response.get_data(as_text=True), parse_constant=_not_strict_json)
    assert f"{store.k_running}#{run}-unreadable" in roger.quarantined()


def _not_strict_json(constant: str) -> Any:
    raise AssertionError(f"not strict JSON: {constant}")
