"""Bad input: the worker never crashes and nothing vanishes silently.

Malformed broker messages, roger headers of the wrong type, huge arguments, keys full of
unicode and Redis glob characters, queues and job ids that do not exist, and settings of
the wrong type, each against a real Redis and real worker subprocesses. Invalid keys at
publish (type, size, encoding) are covered by tests/test_queue_keys.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest

from celery_roger import DuplicateJob, Roger
from celery_roger.runtime import runtime
from celery_roger.testing import WorkerProcess

from .conftest import APPS, events, wait_until

REDIS_BROKER = not os.environ.get("ROGER_TEST_BROKER")


@pytest.fixture
def roger(app_module):
    return Roger(app_module.app)


@pytest.fixture
def cli(redis_url, run):
    env = {**os.environ, "ROGER_TEST_REDIS_URL": redis_url, "ROGER_TEST_QUEUE": f"q-{run}",
           "PYTHONPATH": os.pathsep.join([str(APPS), os.environ.get("PYTHONPATH", "")])}

    def call(*args, ok=True):
        proc = subprocess.run([sys.executable, "-m", "celery", "-A", "roger_app", "roger",
                               *args], cwd=APPS, env=env, capture_output=True, text=True,
                              timeout=60)
        assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
        assert (proc.returncode == 0) == ok, (proc.returncode, proc.stdout, proc.stderr)
        return proc
    return call


def attempts(r, run, name):
    return [e for e in events(r, run, "attempt") if e["name"] == name]


def publish_raw(app, queue, body, **options):
    """Publish a message by hand (kombu's producer), bypassing Celery and roger."""
    with app.producer_or_acquire() as producer:
        producer.publish(body, exchange="", routing_key=queue, **options)


def depth(roger, queue):
    return roger.info()["queues"].get(queue, {}).get("depth") or 0


# -- malformed messages ------------------------------------------------------------------


def test_malformed_messages_are_logged_and_dropped_and_the_worker_goes_on(
        app_module, run, r, roger, worker):
    """Each is logged (by Celery, or by roger's guard for what is not a kombu message at
    all) and removed from the queue; the worker keeps serving roger jobs."""
    app = app_module.app
    queue = f"q-{run}"
    w = worker()
    unknown_id = f"{run}-unknown-task"
    publish_raw(app, queue, b"\x00\xff not json {", content_type="application/json",
                content_encoding="utf-8",
                headers={"task": "roger_app.fragile", "id": f"{run}-garbage", "lang": "py"})
    publish_raw(app, queue, [[run, "x"], {}, {}], serializer="json",
                headers={"task": "no.such.task", "id": unknown_id, "lang": "py"})
    publish_raw(app, queue, {"hello": "world"}, serializer="json")
    expected = ["Can't decode message body", "Received unregistered task of type "
                "'no.such.task'", "Received and deleted unknown message"]
    if REDIS_BROKER:
        # Entries another program pushed into the queue's list: not kombu messages.
        r.lpush(queue, b"\x00\xff not json at all", b'{"a": 1}', b"[1, 2]",
                json.dumps({"body": "", "properties": {"delivery_tag": "t"}}))
        expected += ["Discarded an entry of a broker queue that is not JSON",
                     "that is not a kombu message (KeyError: 'properties'): {'a': 1}",
                     "that is not a kombu message (TypeError: list indices",
                     "that is not a kombu message (ValueError: its delivery_info lacks"]

    good = app_module.fragile.apply_async((run, "good"), queue_key=f"{run}:qk",
                                          execution_key=f"{run}:ek")
    assert good.get(timeout=20) == "good"
    for text in expected:
        wait_until(lambda t=text: t in w.log(), timeout=10, what=f"{text!r} in the worker log")
    assert w.is_alive(), w.log()[-3000:]
    assert "Unrecoverable error" not in w.log()
    assert depth(roger, queue) == 0  # all of them consumed and dropped, none redelivered
    assert app.AsyncResult(unknown_id).state == "FAILURE"  # Celery stores NotRegistered
    # And the worker still serves keyed jobs.
    assert app_module.fragile.apply_async((run, "after"), queue_key=f"{run}:qk2",
                                          execution_key=f"{run}:ek").get(timeout=20) == "after"


def test_jobs_a_worker_refuses_release_their_keys(app_module, run, r, roger, worker):
    """A keyed job whose message the worker refuses before roger sees it (content it does
    not accept, a task it does not know) is logged, FAILURE, and its keys are freed."""
    app = app_module.app
    w = worker()
    pickled = app_module.fragile.apply_async((run, "pickled"), queue_key=f"{run}:pk",
                                             execution_key=f"{run}:pe", serializer="pickle")
    unknown = app.send_task("roger_app.not_deployed_yet", (run,), queue_key=f"{run}:nd")
    wait_until(lambda: roger.store.queue_key_holder(f"{run}:pk") is None
               and roger.store.execution_key_holder(f"{run}:pe") is None,
               timeout=10, what="the refused pickled job's keys to be released")
    wait_until(lambda: roger.store.queue_key_holder(f"{run}:nd") is None, timeout=10,
               what="the unknown task's queue key to be released")
    assert "Refusing to deserialize untrusted content of type pickle" in w.log()
    assert f"Job roger_app.fragile[{pickled.id}] was refused by this worker" in w.log()
    wait_until(lambda: app.AsyncResult(pickled.id).state == "FAILURE", timeout=10,
               what="the pickled job's FAILURE")
    wait_until(lambda: app.AsyncResult(unknown.id).state == "FAILURE", timeout=10,
               what="the unknown task's FAILURE")
    assert attempts(r, run, "pickled") == []
    # Both keys can be taken again at once.
    again = app_module.fragile.apply_async((run, "again"), queue_key=f"{run}:pk",
                                           execution_key=f"{run}:pe")
    assert again.get(timeout=20) == "again"


# -- roger headers of the wrong type -----------------------------------------------------


BAD_HEADERS = [
    "garbage",
    ["a", 1],
    {"rc": "abc", "ek": 5},
    {"rc": float("inf"), "at": float("nan"), "q": 5, "qk": ["x"]},
    {"rc": -3, "ek": ""},
]


def test_roger_headers_of_the_wrong_type(app_module, run, r, roger, worker, caplog):
    """A malformed ``roger`` header never crashes the worker nor loses the job: what is
    malformed is treated as absent (a warning names the job), and the job runs."""
    app = app_module.app
    queue = f"q-{run}"
    w = worker()
    # Given to apply_async: roger replaces what is not its header, and the job is keyed.
    with caplog.at_level("WARNING", logger="celery_roger"):
        given = app_module.fragile.apply_async((run, "given"), headers={"roger": "garbage"},
                                               queue_key=f"{run}:given")
    assert "headers['roger'] is not roger's header (str); it is replaced" in caplog.text
    assert roger.store.queue_key_holder(f"{run}:given") == given.id
    # Published by plain Celery (roger's publish side bypassed): the worker copes.
    send = runtime(app).original_send_task
    raw = [send("roger_app.fragile", (run, f"raw{i}"), headers={"roger": header})
           for i, header in enumerate(BAD_HEADERS)]
    # A retryable job with a bad header that fails is retried and buried as usual.
    failing = send("roger_app.once", (run, "failing", "fail"), headers={"roger": "garbage"})

    assert given.get(timeout=20) == "given"
    for i, result in enumerate(raw):
        assert result.get(timeout=20) == f"raw{i}"
    wait_until(lambda: [b.id for b in roger.buried(queue)] == [failing.id], timeout=20,
               what="the failing job's burial")
    assert len(attempts(r, run, "failing")) == 2
    log = w.log()
    for result in raw:
        assert f"[{result.id}]: its roger header is malformed" in log
    assert "not a mapping but str 'garbage'" in log
    assert "fields of the wrong type: rc='abc', ek=5" in log
    assert "rc=inf, at=nan, q=5, qk=['x']" in log
    assert w.is_alive() and "Unrecoverable error" not in log, log[-3000:]


# -- huge arguments ----------------------------------------------------------------------


def test_huge_arguments(app_module, run, r, roger, worker):
    """A 3 MB argument with both keys publishes, parks, runs; roger's records stay small."""
    worker()
    store = roger.store
    big = "x" * (3 * 1024 * 1024)
    qk, ek = f"{run}:qk", f"{run}:ek"
    holder = app_module.fragile.apply_async((run, "holder", "sleep", 60), execution_key=ek)
    wait_until(lambda: attempts(r, run, "holder"), timeout=10, what="the holder to start")
    job = app_module.fragile.apply_async((run, "big", "sleep", 3, big), queue_key=qk,
                                         execution_key=ek)
    wait_until(lambda: roger.job(job.id)["state"] == "parked", timeout=10,
               what="the big job to park")
    with pytest.raises(DuplicateJob):
        app_module.fragile.apply_async((run, "dup"), queue_key=qk)
    assert len(json.dumps(roger.job(job.id))) < 4096
    roger.cancel(holder.id)  # hands the execution key to the big job
    wait_until(lambda: roger.job(job.id)["state"] == "running", timeout=15,
               what="the big job to run")
    record = store.redis.hget(store.k_running, job.id)
    assert record is not None and len(record) < 2048 and b"args" not in record
    info = json.dumps(roger.info())
    assert job.id in info and len(info) < 65536
    assert job.get(timeout=30) == "big"
    wait_until(lambda: store.queue_key_holder(qk) is None, timeout=10,
               what="the big job's queue key to be released")
    # Without an execution key (admitted by its start check) too.
    assert app_module.fragile.apply_async((run, "big2", "ok", 0, big),
                                          queue_key=qk).get(timeout=30) == "big2"


# -- unicode and Redis-special characters in keys ----------------------------------------


def test_keys_with_unicode_and_redis_special_characters(app_module, run, r, roger, worker,
                                                        cli):
    queue = f"q-{run}"
    key = f"{run}:ключ:*?[]{{}}\\ \n 🙂"
    long_key = f"{run}:" + "é" * ((1024 - len(run) - 1) // 2)
    long_key += "k" * (1024 - len(long_key.encode()))
    assert len(long_key.encode()) == 1024
    # One byte over: refused at publish, naming the task and the key; nothing published.
    with pytest.raises(ValueError, match=r"roger_app\.fragile: execution_key is 1025 bytes"):
        app_module.fragile.apply_async((run, "over"), execution_key=long_key + "k")
    assert depth(roger, queue) == 0
    assert roger.keys("execution", prefix=f"{run}:")["keys"] == []

    worker()
    holder = app_module.fragile.apply_async((run, "a", "sleep", 60), queue_key=key,
                                            execution_key=key)
    wait_until(lambda: attempts(r, run, "a"), timeout=10, what="the first job to start")
    with pytest.raises(DuplicateJob) as dup:
        app_module.fragile.apply_async((run, "dup"), queue_key=key)
    assert dup.value.queue_key == key and dup.value.existing_id == holder.id
    parked = app_module.fragile.apply_async((run, "b"), execution_key=key)
    wait_until(lambda: roger.store.parked_ids(key) == [parked.id], timeout=10,
               what="the second job to park behind the key")
    # Glob characters in a prefix are literal: "ключ:?" does not match "ключ:*".
    assert roger.keys("queue", prefix=f"{run}:ключ:*?[]{{")["keys"] == [
        {"key": key, "holder": holder.id}]
    assert roger.keys("execution", prefix=f"{run}:ключ:?")["keys"] == []
    listed = json.loads(cli("keys", "--kind", "execution", "--prefix", f"{run}:",
                            "--json").stdout)
    assert listed["execution"]["keys"] == [{"key": key, "holder": holder.id}]
    (held,) = [k for k in roger.info()["execution_keys"]["keys"] if k["key"] == key]
    assert held["holder"] == holder.id and held["parked"] == 1
    assert f"execution key {key!r} is held by job {holder.id}" in \
        roger.job(parked.id)["explanation"]

    roger.cancel(holder.id)  # mutual exclusion held until then: the parked job runs now
    assert parked.get(timeout=20) == "b"
    assert attempts(r, run, "b") and len(attempts(r, run, "a")) == 1

    # The 1024-byte key works as a queue key and an execution key, and is released by
    # the CLI like any other.
    waiting = app_module.fragile.apply_async((run, "c"), queue_key=long_key,
                                             execution_key=long_key, countdown=60)
    out = cli("keys", "--release", long_key).stdout
    assert "released queue key" in out and f"(held by {waiting.id})" in out
    assert roger.store.queue_key_holder(long_key) is None
    unicode_waiting = app_module.fragile.apply_async((run, "d"), queue_key=key, countdown=60)
    assert f"(held by {unicode_waiting.id})" in cli("keys", "--release", key).stdout
    assert roger.store.queue_key_holder(key) is None
    assert "(it was not held)" in cli("keys", "--kind", "execution", "--release", key).stdout
    roger.cancel(waiting.id)
    roger.cancel(unicode_waiting.id)


# -- queues and jobs that do not exist ---------------------------------------------------


def test_queues_that_do_not_exist(app_module, run, roger, cli):
    """A clear answer for each (pausing a queue no worker consumes yet is allowed: workers
    started later honour it), never a traceback or a broken broker channel."""
    queue = f"no-such-queue-{run}"
    roger.pause(queue)
    assert queue in roger.paused_queues()
    view = roger.info()["queues"][queue]
    assert view["paused"] and view["depth"] == 0 and view["running"] == 0
    assert queue in cli("status").stdout
    assert json.loads(cli("status", "--json").stdout)["queues"][queue]["paused"]
    assert roger.resume(queue) == 0 and queue not in roger.paused_queues()
    assert roger.purge_queue(queue) == 0
    assert roger.purge_queue(queue) == 0  # the broker connection is still usable
    assert roger.buried(queue) == [] and roger.purge_buried(queue) == 0
    assert roger.requeue_buried(queue=queue, all=True) == 0
    assert cli("pause", queue).stdout.strip() == f"paused {queue}"
    assert cli("resume", queue).stdout.strip() == f"resumed {queue}"
    assert cli("buried", queue).stdout.strip() == "no buried jobs"
    assert json.loads(cli("buried", queue, "--json").stdout) == []
    assert cli("purge-buried", queue).stdout.strip() == "purged 0"
    assert cli("requeue", "--queue", queue, "--all").stdout.strip() == "requeued 0"
    # A real queue is purged as usual afterwards.
    app_module.fragile.apply_async((run, "x"), queue_key=f"{run}:qk")
    assert roger.purge_queue(f"q-{run}") == 1
    assert roger.store.queue_key_holder(f"{run}:qk") is None


def test_job_ids_that_do_not_exist(app_module, run, roger, cli):
    job_id = f"{run}-ид/../🙂 x"
    view = roger.job(job_id)
    assert view["state"] == "queued-or-unknown" and "not in roger state" in view["explanation"]
    assert roger.requeue_buried(job_id) == 0
    assert roger.release_key("queue", f"{run}-no-key") is None
    assert roger.release_key("execution", f"{run}-no-key") is None
    assert json.loads(cli("job", job_id, "--json").stdout)["state"] == "queued-or-unknown"
    proc = cli("requeue", job_id, ok=False)
    assert proc.stderr.strip().splitlines()[-1] == (
        f"Error: {job_id} was not requeued: not buried, or its queue key is held by "
        "another job")
    assert "(it was not held)" in cli("keys", "--release", f"{run}-no-key").stdout
    # Cancelling it is harmless, and remembered (a copy delivered later is dropped).
    assert roger.cancel(job_id) == ""
    assert cli("cancel", job_id).stdout.strip().startswith(
        f"{job_id} is unknown to roger: the cancellation is stored")
    assert roger.job(job_id)["state"] == "cancelled"


# -- settings of the wrong type ----------------------------------------------------------


@pytest.mark.parametrize(("setting", "value", "message"), [
    ("roger_retry_levels", "abc", "roger_retry_levels must be a list of seconds, got 'abc'"),
    ("roger_lease_seconds", "x", "setting roger_lease_seconds must be a number, got 'x'"),
    ("roger_partition", "", "setting roger_partition must be a non-empty string"),
    ("roger_redis_url", "http://user:pw@x",
     "setting roger_redis_url must be a redis://, rediss:// or unix:// URL, got "
     "'http://user:***@x'"),
    ("roger_callbacks", "no.such.module",
     "setting roger_callbacks: cannot import 'no.such.module'"),
    ("roger_buried_max", 1.5, "setting roger_buried_max must be an integer, got 1.5"),
])
def test_bad_settings_stop_the_worker_at_start(app_module, run, redis_url, roger, tmp_path,
                                               setting, value, message):
    """The worker exits non-zero at start-up, before it takes any job, naming the setting."""
    queue = f"q-{run}"
    waiting = app_module.fragile.apply_async((run, "waiting"))
    w = WorkerProcess(
        "roger_app", queues=[queue], cwd=str(APPS), log_dir=str(tmp_path),
        name=f"bad-{uuid.uuid4().hex[:6]}@%h",
        env={"ROGER_TEST_REDIS_URL": redis_url, "ROGER_TEST_QUEUE": queue,
             "ROGER_TEST_SETTINGS": json.dumps({setting: value}),
             "PYTHONPATH": os.pathsep.join([str(APPS), os.environ.get("PYTHONPATH", "")])})
    started = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match="worker exited"):
            w.start(timeout=30)
        assert time.monotonic() - started < 30
        assert w.process is not None and w.process.returncode != 0
        log = w.log()
        assert "Unrecoverable error: ConfigurationError" in log and message in log, log[-3000:]
        assert " ready." not in log
        assert "pw@" not in log
    finally:
        w.stop()
    # It took no job: the one waiting is still in its queue.
    assert depth(roger, queue) == 1
    assert roger.purge_queue(queue) == 1 and waiting.state == "PENDING"
