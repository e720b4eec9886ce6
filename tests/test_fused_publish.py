"""Fused publish (issue 14): on a Redis broker that is roger's database, a publish with a
queue key is one script that takes the key and pushes the message together. Real Redis,
real publisher processes; each fallback case is checked to take the long road (take,
publish, confirm) and keep its guarantees."""

from __future__ import annotations

import inspect
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from celery.signals import after_task_publish, before_task_publish
from kombu import Exchange, Queue
from kombu.transport import redis as redis_transport

from celery_roger import DuplicateJob
from celery_roger.runtime import runtime
from celery_roger.store import kombu_loads

from .conftest import APPS, wait_until

pytestmark = pytest.mark.redis_broker("fused publish is for a Redis broker")


@pytest.fixture(autouse=True)
def release_the_runs_keys(run, r):
    """These tests leave hundreds of queue keys held with no worker to run their jobs:
    released after each, so the partition's listings stay the other tests' own."""
    yield
    keys = [k for k in r.hkeys("roger:{test}:qkeys") if k.decode().startswith(run)]
    if keys:
        r.hdel("roger:{test}:qkeys", *keys)
        r.zrem("roger:{test}:qk_pending", *keys)
    lists = r.keys(f"q*-{run}*")
    if lists:
        r.delete(*lists)


def commands(r: Any) -> dict[str, int]:
    stats = r.info("commandstats")
    return {k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items()}


def spent(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


def queued_ids(r: Any, queue: str) -> list[str]:
    return [kombu_loads(m)["headers"]["id"] for m in r.lrange(queue, 0, -1)]


def holders(r: Any, run: str) -> dict[str, str]:
    found = {k.decode(): v.decode() for k, v in r.hgetall("roger:{test}:qkeys").items()}
    return {k: v for k, v in found.items() if k.startswith(run)}


def pending(r: Any, run: str) -> list[str]:
    return [k.decode() for k in r.zrange("roger:{test}:qk_pending", 0, -1)
            if k.decode().startswith(run)]


def test_a_publish_with_a_queue_key_is_one_round_trip(app_module, run, r):
    task = app_module.fragile
    assert runtime(app_module.app).fuse.usable
    task.apply_async((run, "warm"), queue_key=f"{run}:warm")  # the token, the script
    before = commands(r)
    ids = [task.apply_async((run, f"j{i}"), queue_key=f"{run}:k{i}").id for i in range(20)]
    used = spent(before, commands(r))
    # commandstats counts the commands a script runs too: the LPUSH is the script's.
    assert used.get("evalsha") == 20, f"one script per publish (the long road: 2): {used}"
    assert used.get("lpush") == 20 and used.get("hset") == 20, used
    assert sorted(queued_ids(r, f"q-{run}")[:20]) == sorted(ids)
    assert holders(r, run) == {f"{run}:k{i}": ids[i] for i in range(20)} | {
        f"{run}:warm": holders(r, run)[f"{run}:warm"]}
    assert pending(r, run) == [], "a fused key is never pending"


def test_a_refused_duplicate_sends_nothing_after_kombu(app_module, run, r):
    task = app_module.fragile
    seen: dict[str, list[str]] = {"before": [], "after": []}

    def before(headers=None, **_):
        seen["before"].append(headers["id"])

    def after(headers=None, **_):
        seen["after"].append(headers["id"])

    before_task_publish.connect(before, weak=False)
    after_task_publish.connect(after, weak=False)
    try:
        first = task.apply_async((run, "a"), queue_key=f"{run}:dup")
        with pytest.raises(DuplicateJob) as refused:
            task.apply_async((run, "b"), queue_key=f"{run}:dup", task_id=f"{run}-second")
    finally:
        before_task_publish.disconnect(before)
        after_task_publish.disconnect(after)
    assert refused.value.existing_id == first.id
    assert queued_ids(r, f"q-{run}") == [first.id]
    # Celery fired before_task_publish before kombu was reached (README says so) ...
    assert seen["before"] == [first.id, f"{run}-second"]
    # ... but nothing after it, and no result subscription is left for the refused job.
    assert seen["after"] == [first.id]
    consumer = app_module.app.backend.result_consumer
    key = app_module.app.backend.get_key_for_task(f"{run}-second")
    wait_until(lambda: key not in consumer.subscribed_to, timeout=5,
               what="the refused job's result subscription to be cancelled")


def test_a_replayed_script_never_pushes_twice_nor_refuses_its_own_job(app_module, run, r):
    store = runtime(app_module.app).store
    token = runtime(app_module.app).fuse.token()
    queue = f"q-{run}"

    def fused(job: str) -> list[Any]:
        return store.publish_fused(r, queue, token, f"{run}:k", job, f'"{job}"', 0)

    assert fused("a") == ["sent"]
    assert fused("a") == ["replay"]  # kombu or redis-py sent it again after a lost reply
    assert fused("b")[:1] == ["refused"] and store.queue_key_holder(f"{run}:k") == "a"
    assert r.lrange(queue, 0, -1) == [b'"a"']
    assert store.publish_fused(r, queue, "not-the-token", f"{run}:other", "c", "x", 0) == \
        ["unproven"]
    assert r.llen(queue) == 1 and store.queue_key_holder(f"{run}:other") is None


def test_after_a_flushdb_one_publish_falls_back_and_the_next_is_fused(app_module, run, r,
                                                                      worker):
    task = app_module.fragile
    task.apply_async((run, "warm"), queue_key=f"{run}:warm")
    r.delete("roger:{test}:fuse")  # what a FLUSHDB or a restart without persistence does
    before = commands(r)
    first = task.apply_async((run, "a"), queue_key=f"{run}:a")
    middle = spent(before, commands(r))
    second = task.apply_async((run, "b"), queue_key=f"{run}:b")
    after = spent(before, commands(r))
    # fused (unproven), then take and confirm; the push is the client's own
    assert middle["evalsha"] - middle.get("script|load", 0) == 3 and middle["lpush"] == 1, \
        f"the first publish took the long road: {middle}"
    assert after["evalsha"] - middle["evalsha"] == 1, f"the second one is fused: {after}"
    assert pending(r, run) == [], "the long road confirmed its key"
    with pytest.raises(DuplicateJob):
        task.apply_async((run, "a2"), queue_key=f"{run}:a")
    worker()
    assert first.get(timeout=30) == "a" and second.get(timeout=30) == "b"


def test_another_database_is_found_out_once(redis_url, run, r):
    """A roger state database other than the broker's: one publish proves it, the rest go
    the long road from the start."""
    script = f"""
import json, roger_app
from celery_roger.runtime import runtime
app = roger_app.app
for i in range(3):
    roger_app.fragile.apply_async(("{run}", f"j{{i}}"), queue_key=f"{run}:k{{i}}")
print(json.dumps({{"usable": runtime(app).fuse.usable}}))
"""
    state_url = redis_url.rsplit("/", 1)[0] + "/3"
    out = subprocess.run([sys.executable, "-c", script], cwd=APPS, capture_output=True,
                         text=True, timeout=60,
                         env={**os.environ, "ROGER_TEST_REDIS_URL": redis_url,
                              "ROGER_TEST_STATE_URL": state_url, "ROGER_TEST_QUEUE": f"q-{run}",
                              "PYTHONPATH": str(APPS)})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == {"usable": False}
    assert "is not roger's" in out.stderr
    state = type(r).from_url(state_url)
    assert len([k for k in state.hkeys("roger:{test}:qkeys") if k.startswith(run.encode())]) == 3
    assert not [k for k in state.zrange("roger:{test}:qk_pending", 0, -1)
                if k.startswith(run.encode())], "the long road confirmed each key"
    assert r.llen(f"q-{run}") == 3


@pytest.mark.parametrize("case", ["topic exchange", "fanout exchange", "queue expires",
                                  "two queues bound"])
def test_what_cannot_be_fused_takes_the_long_road(app_module, run, r, case):
    app = app_module.app
    if case == "queue expires" and "self._expires" not in inspect.getsource(
            redis_transport.Channel.__init__):
        pytest.skip("this kombu's Redis transport ignores x-expires (kombu < 5.7)")
    exchange = Exchange(f"x-{run}", type={"topic exchange": "topic",
                                          "fanout exchange": "fanout"}.get(case, "direct"))
    queues = [Queue(f"q-{run}", exchange, routing_key=f"rk-{run}",
                    expires=60 if case == "queue expires" else None)]
    if case == "two queues bound":
        queues.append(Queue(f"q2-{run}", exchange, routing_key=f"rk-{run}"))
    with app.producer_or_acquire() as producer:  # the publishes' own connection
        for queue in queues:
            queue(producer.channel).declare()
    before = commands(r)
    # Celery declares a Queue given to the publish on its channel (kombu then knows its
    # x-expires, as it would in an app that routes to it); to a Queue on a direct exchange
    # it publishes by the queue's name, so the two bound queues get exchange and key.
    route = {"queue": queues[0]} if case != "two queues bound" else {
        "exchange": exchange, "routing_key": f"rk-{run}"}
    result = app_module.fragile.apply_async((run, "a"), queue_key=f"{run}:k", **route)
    used = spent(before, commands(r))
    assert used.get("evalsha", 0) - used.get("script|load", 0) == 2, \
        f"take and confirm, not the fused script: {used}"
    assert holders(r, run) == {f"{run}:k": result.id} and pending(r, run) == []
    with pytest.raises(DuplicateJob):
        app_module.fragile.apply_async((run, "b"), queue_key=f"{run}:k", **route)
    if case != "fanout exchange":  # a fanout message goes to subscribers, not lists
        assert queued_ids(r, f"q-{run}") == [result.id]
    if case == "two queues bound":
        assert queued_ids(r, f"q2-{run}") == [result.id]


def test_a_kombu_publish_batch_confirms_after_its_flush(app_module, run, r):
    app = app_module.app
    with app.producer_or_acquire() as producer:
        if not hasattr(producer, "batch"):
            pytest.skip("kombu < 5.7 has no publish batches")
        with producer.batch():
            result = app_module.fragile.apply_async((run, "a"), queue_key=f"{run}:k",
                                                   producer=producer)
            assert pending(r, run) == [f"{run}:k"], "taken, not yet confirmed"
            assert r.llen(f"q-{run}") == 0, "not yet sent"
    assert queued_ids(r, f"q-{run}") == [result.id]
    assert holders(r, run) == {f"{run}:k": result.id} and pending(r, run) == []


def test_priorities_are_fused_to_their_list(app_module, run, r, worker):
    before = commands(r)
    result = app_module.fragile.apply_async((run, "a"), queue_key=f"{run}:k", priority=5)
    assert spent(before, commands(r)).get("evalsha") == 1
    lists = [k.decode() for k in r.keys(f"q-{run}*")]
    assert lists and all(k != f"q-{run}" for k in lists), f"a priority list: {lists}"
    worker()
    assert result.get(timeout=30) == "a"


def publishers(run: str, count: int, jobs: list[dict[str, Any]], redis_url: str,
               ) -> list[subprocess.Popen]:
    spec = json.dumps({"run": run, "task": "fragile", "jobs": jobs})
    env = {**os.environ, "ROGER_TEST_REDIS_URL": redis_url, "ROGER_TEST_QUEUE": f"q-{run}",
           "PYTHONPATH": str(APPS)}
    return [subprocess.Popen([sys.executable, str(Path(APPS) / "load_publisher.py"), spec],
                             cwd=APPS, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(count)]


def test_sixteen_concurrent_publishers_one_accepted_per_key(app_module, run, r, redis_url):
    start = time.time() + 4  # every process imported and connected by then
    jobs = [{"name": f"j{k}", "qk": f"{run}:k{k}", "at": start} for k in range(25)]
    procs = publishers(run, 16, jobs, redis_url)
    lines = []
    for proc in procs:
        out, err = proc.communicate(timeout=90)
        assert proc.returncode == 0, err
        lines += [json.loads(line) for line in out.splitlines()]
    assert not [x for x in lines if "error" in x], lines
    accepted = {x["qk"]: x["ok"] for x in lines if "ok" in x}
    assert len([x for x in lines if "ok" in x]) == 25, "exactly one publish per key"
    assert all(x["duplicate"] == accepted[x["qk"]] for x in lines if "duplicate" in x)
    assert sorted(queued_ids(r, f"q-{run}")) == sorted(accepted.values())
    assert holders(r, run) == accepted and pending(r, run) == []


def test_a_publisher_killed_mid_publish_leaves_nothing_behind(app_module, run, r, redis_url):
    rng = random.Random()
    for round_ in range(4):
        jobs = [{"name": f"r{round_}-j{k}", "qk": f"{run}:r{round_}:k{k}"} for k in range(400)]
        so_far = r.llen(f"q-{run}")
        (proc,) = publishers(run, 1, jobs, redis_url)
        wait_until(lambda p=proc, n=so_far: r.llen(f"q-{run}") > n or p.poll() is not None,
                   timeout=30, what="the publisher's first publish")
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    queued = set(queued_ids(r, f"q-{run}"))
    held = holders(r, run)
    assert queued, "the publishers published"
    assert set(held.values()) == queued, "every held key has its message, and every message its key"
    assert pending(r, run) == []
