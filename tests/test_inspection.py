"""Inspection (SPEC section 8): info, job explanations, keys, the CLI, remote inspect,
the dashboard's JSON API and auth rules, /metrics, and task-roger-* events."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from celery_roger import Roger
from celery_roger.testing import free_port

from .conftest import APPS, events, wait_until


@pytest.fixture
def roger(app_module):
    return Roger(app_module.app)


def cli_env(redis_url, run):
    return {**os.environ, "ROGER_TEST_REDIS_URL": redis_url, "ROGER_TEST_QUEUE": f"q-{run}",
            "PYTHONPATH": os.pathsep.join([str(APPS), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture
def cli(redis_url, run):
    def call(*args, check=True):
        proc = subprocess.run([sys.executable, "-m", "celery", "-A", "roger_app", "roger",
                               *args], cwd=APPS, env=cli_env(redis_url, run),
                              capture_output=True, text=True, timeout=60)
        if check:
            assert proc.returncode == 0, proc.stderr
        return proc
    return call


def attempts(r, run, name=None):
    return [e for e in events(r, run, "attempt") if name is None or e["name"] == name]


def test_info_and_job_explanations(app_module, run, r, roger, worker):
    w = worker(concurrency=2)
    key = f"{run}:ek"
    holder = app_module.fragile.apply_async((run, "holder", "sleep", 4), execution_key=key,
                                            queue_key=f"{run}:qk")
    wait_until(lambda: attempts(r, run, "holder"), timeout=10, what="the holder to start")
    parked = [app_module.fragile.apply_async((run, f"p{i}"), execution_key=key)
              for i in range(2)]
    wait_until(lambda: len(roger.store.parked_ids(key)) == 2, timeout=10, what="parking")
    retrying = app_module.keyed_slow_retry.delay(run, "r", "fail")
    wait_until(lambda: roger.store.retry_due_at(retrying.id), timeout=10, what="a retry")
    buried = app_module.once.delay(run, "b", "fail")
    wait_until(lambda: roger.buried(f"q-{run}"), timeout=10, what="a burial")
    roger.cancel(f"{run}-never")
    other = f"q-{run}-paused"
    roger.pause(other, reason="maintenance")

    info = json.loads(json.dumps(roger.info()))  # JSON-ready
    assert info["partition"] == "test"
    q = info["queues"][f"q-{run}"]
    assert q["running"] >= 1 and q["parked"] == 2 and q["buried"] == 1 and not q["paused"]
    assert info["queues"][other]["paused"] and info["queues"][other]["paused_reason"] == \
        "maintenance"
    (held,) = [k for k in info["execution_keys"]["keys"] if k["key"] == key]
    assert held["holder"] == holder.id and held["parked"] == 2 and held["worker_alive"]
    assert held["worker"] == w.nodename and held["lease_expires"] > time.time()
    assert any(j["id"] == holder.id and j["worker"] == w.nodename
               for j in info["running"]["jobs"])
    assert {"key": f"{run}:qk", "holder": holder.id} in info["queue_keys"]["keys"]
    assert f"{run}-never" in info["cancellations"]["ids"]
    assert info["retrying"] >= 1

    view = roger.job(holder.id)
    assert view["state"] == "running" and view["worker"] == w.nodename
    view = roger.job(parked[1].id)
    assert view["state"] == "parked" and view["holder"] == holder.id
    assert view["position"] == 2 and view["holder_worker"] == w.nodename
    assert view["holder_worker_alive"] is True
    assert f"held by job {holder.id} on {w.nodename} (alive)" in view["explanation"]
    view = roger.job(retrying.id)
    assert view["state"] == "retrying" and view["next_run"] > time.time() - 1
    assert "waiting for retry 1" in view["explanation"]
    view = roger.job(buried.id)
    assert view["state"] == "buried" and "RuntimeError: boom b" in view["explanation"]
    assert roger.job(f"{run}-never")["state"] == "cancelled"
    view = roger.job(f"{run}-unknown")
    assert view["state"] == "queued-or-unknown" and other in view["explanation"]
    roger.resume(other)

    page = roger.keys("execution", prefix=f"{run}:", limit=10)
    assert page["keys"] == [{"key": key, "holder": holder.id}]
    with pytest.raises(ValueError, match="kind"):
        roger.keys("nope")


def test_job_explains_a_paused_queue_and_a_dead_holder(app_module, run, r, roger, worker):
    queue = f"q-{run}"
    w = worker(env={"ROGER_TEST_LEASE": "3"})
    app_module.fragile.apply_async((run, "holder", "sleep", 30), execution_key=f"{run}:ek")
    wait_until(lambda: attempts(r, run, "holder"), timeout=10, what="the holder")
    parked = app_module.fragile.apply_async((run, "parked"), execution_key=f"{run}:ek")
    wait_until(lambda: roger.store.parked_ids(f"{run}:ek"), timeout=10, what="parking")
    roger.pause(queue)
    held = app_module.fragile.apply_async((run, "held"), countdown=0)
    # A job delivered to a worker of a paused queue is held in Redis, or stays queued.
    time.sleep(1)
    view = roger.job(held.id)
    assert view["state"] in ("held", "queued-or-unknown") and queue in view["explanation"]
    roger.resume(queue)
    w.kill()  # SIGKILL: the holder's worker is gone; no other worker heals its keys
    view = wait_until(lambda: (v := roger.job(parked.id))["holder_worker_alive"] is False
                      and v, timeout=10, what="the holder's lease to end")
    assert view["state"] == "parked" and "lease ended" in view["explanation"]


def test_cli(app_module, run, r, roger, worker, cli):
    worker()
    queue = f"q-{run}"
    assert cli("pause", queue, "--reason", "deploy").stdout.strip() == f"paused {queue}"
    status = json.loads(cli("status", "--json").stdout)
    assert status["queues"][queue]["paused"] and status["queues"][queue]["paused_reason"] == \
        "deploy"
    human = cli("status").stdout
    assert "QUEUE" in human and queue in human and "deploy" in human
    assert "resumed" in cli("resume", queue).stdout

    job = app_module.fragile.apply_async((run, "a", "sleep", 30), queue_key=f"{run}:qk")
    wait_until(lambda: attempts(r, run, "a"), timeout=10, what="the job to start")
    view = json.loads(cli("job", job.id, "--json").stdout)
    assert view["state"] == "running"
    keys = json.loads(cli("keys", "--kind", "queue", "--prefix", f"{run}:", "--json").stdout)
    assert keys["queue"]["keys"] == [{"key": f"{run}:qk", "holder": job.id}]
    assert "running" in cli("cancel", job.id).stdout
    wait_until(lambda: app_module.app.AsyncResult(job.id).state == "REVOKED", timeout=10,
               what="the cancel")

    failing = app_module.once.delay(run, "b", "fail")
    wait_until(lambda: roger.buried(queue), timeout=10, what="a burial")
    listed = json.loads(cli("buried", queue, "--json").stdout)
    assert [b["id"] for b in listed] == [failing.id]
    assert "RuntimeError" in cli("buried", queue).stdout
    assert cli("requeue", failing.id).stdout.strip() == "requeued 1"
    wait_until(lambda: roger.buried(queue), timeout=15, what="the second burial")
    assert cli("purge-buried", queue).stdout.strip() == "purged 1"

    app_module.fragile.apply_async((run, "c"), queue_key=f"{run}:stuck", countdown=60)
    out = cli("keys", "--release", f"{run}:stuck").stdout
    assert "released queue key" in out and roger.store.queue_key_holder(f"{run}:stuck") is None


@pytest.mark.parametrize("args", [
    ("keys", "--kind", "bogus"), ("keys", "--limit", "0"), ("requeue",),
    ("requeue", "--queue", "x"), ("cancel",), ("buried", "--offset", "-1"),
    ("job", ""), ("pause", ""), ("nosuchcommand",),
])
def test_cli_bad_arguments_give_one_line_and_nonzero_exit(cli, args):
    proc = cli(*args, check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, proc.stderr


def test_remote_inspect(app_module, run, r, roger, worker):
    w = worker()
    roger.pause(f"q-{run}-other")
    job = app_module.fragile.apply_async((run, "a", "sleep", 30), execution_key=f"{run}:ek",
                                         queue_key=f"{run}:qk")
    wait_until(lambda: attempts(r, run, "a"), timeout=10, what="the job to start")
    replies = app_module.app.control.inspect(destination=[w.nodename], timeout=2)._request(
        "roger")
    mine = replies[w.nodename]
    assert [j["id"] for j in mine["running"]] == [job.id]
    assert mine["execution_keys"] == [f"{run}:ek"] and mine["queue_keys"] == [f"{run}:qk"]
    assert f"q-{run}-other" in mine["paused_applied"]
    assert mine["consumed_at_start"] == [f"q-{run}"]
    roger.resume(f"q-{run}-other")
    roger.cancel(job.id)


@pytest.fixture
def dashboard(redis_url, run, tmp_path):
    """``start(*args, env={...})``: a real ``celery roger dashboard``, stopped after the
    test; ``env`` adds to the CLI's environment."""
    servers = []

    def start(*args, env=None):
        port = free_port()
        log = open(tmp_path / f"dashboard-{port}.log", "w")  # noqa: SIM115
        proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "roger_app", "roger",
                                 "dashboard", "--port", str(port), *args], cwd=APPS,
                                env={**cli_env(redis_url, run), **(env or {})}, stdout=log,
                                stderr=subprocess.STDOUT)
        servers.append(proc)
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: _ok(base + "/api/roger/info"), timeout=20, what="the dashboard")
        return base

    yield start
    for proc in servers:
        proc.terminate()
        proc.wait(10)


def _ok(url):
    try:
        return urllib.request.urlopen(url, timeout=2).status == 200
    except OSError:
        return False


def http(method, url, token=None):
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_dashboard_api_and_auth(app_module, run, r, roger, worker, dashboard):
    worker()
    base = dashboard("--token", "s3cret")
    queue = f"q-{run}"
    pause = f"{base}/api/roger/queues/{queue}/pause"
    assert http("POST", pause)[0] == 401
    assert http("POST", pause, "wrong")[0] == 403
    assert http("GET", pause)[0] == 405  # actions are POST only
    assert queue not in roger.paused_queues()
    assert http("POST", pause, "s3cret")[0] == 200 and queue in roger.paused_queues()
    status, body = http("GET", f"{base}/api/roger/info")
    assert status == 200 and json.loads(body)["queues"][queue]["paused"]
    assert http("POST", f"{base}/api/roger/queues/{queue}/resume", "s3cret")[0] == 200
    assert queue not in roger.paused_queues()

    failing = app_module.once.delay(run, "b", "fail")
    wait_until(lambda: roger.buried(queue), timeout=10, what="a burial")
    status, body = http("GET", f"{base}/api/roger/buried?queue={queue}")
    assert [b["id"] for b in json.loads(body)] == [failing.id]
    assert json.loads(http("GET", f"{base}/api/roger/jobs/{failing.id}")[1])["state"] == \
        "buried"
    assert http("POST", f"{base}/api/roger/buried/{failing.id}/requeue", "s3cret")[0] == 200
    wait_until(lambda: roger.buried(queue), timeout=15, what="the second burial")
    status, body = http("POST", f"{base}/api/roger/buried/purge?queue={queue}", "s3cret")
    assert status == 200 and json.loads(body)["purged"] == 1
    job = app_module.fragile.apply_async((run, "a"), countdown=30)
    assert http("POST", f"{base}/api/roger/jobs/{job.id}/cancel", "s3cret")[0] == 200
    assert roger.store.is_cancelled(job.id)
    assert http("GET", f"{base}/api/roger/buried?limit=x")[0] == 400

    metrics = http("GET", f"{base}/metrics")[1]
    assert f'roger_queue_paused{{partition="test",queue="{queue}"}} 0.0' in metrics
    for name in ("roger_queue_depth", "roger_queue_parked_jobs", "roger_held_execution_keys",
                 "roger_oldest_execution_key_age_seconds", "roger_queue_buried_jobs",
                 "roger_dedup_refusals_total", "roger_cancels_total"):
        assert name in metrics
    assert "key=" not in metrics  # keys are never labels
    page = http("GET", f"{base}/")[1]
    assert "<title>roger: test</title>" in page


def test_dashboard_without_a_token_is_read_only(roger, run, dashboard):
    base = dashboard()
    assert http("GET", f"{base}/api/roger/info")[0] == 200
    assert http("POST", f"{base}/api/roger/queues/q-{run}/pause", "anything")[0] == 403
    assert http("POST", f"{base}/api/roger/queues/q-{run}/pause")[0] == 401
    assert f"q-{run}" not in roger.paused_queues()


def test_roger_steps_are_events_and_final_states_are_celerys(app_module, run, r, roger, worker):
    app = app_module.app
    received: list[dict] = []
    ready = threading.Event()
    stop = threading.Event()

    def listen():
        with app.connection_for_read() as conn:
            recv = app.events.Receiver(conn, handlers={"*": received.append})
            ready.set()
            for _ in recv.itercapture(limit=None, timeout=0.5, wakeup=False):
                if stop.is_set():
                    break

    def capture():
        try:
            listen()
        except Exception:  # the receiver times out when idle: listen again
            if not stop.is_set():
                capture()

    thread = threading.Thread(target=capture, daemon=True)
    thread.start()
    ready.wait(10)
    worker(concurrency=2, extra_args=["-E"])
    key = f"{run}:ek"
    first = app_module.fragile.apply_async((run, "a", "sleep", 0.5), execution_key=key)
    second = app_module.fragile.apply_async((run, "b"), execution_key=key)
    assert second.get(timeout=20) == "b" and first.get(timeout=20) == "a"
    buried = app_module.once.delay(run, "c", "fail")
    wait_until(lambda: roger.buried(f"q-{run}"), timeout=10, what="a burial")

    def kinds(job_id):
        return {e["type"] for e in received if e.get("uuid") == job_id}

    wait_until(lambda: {"roger-parked", "roger-promoted"} <= kinds(second.id),
               timeout=10, what="roger-parked and roger-promoted events")
    wait_until(lambda: "task-failed" in kinds(buried.id), timeout=10,
               what="the buried job's task-failed")
    stop.set()
    failed = [e for e in received if e.get("uuid") == buried.id and e["type"] == "task-failed"]
    assert failed[-1]["exception"].startswith("Buried: "), failed
    # Only the worker sends events about jobs, under its own name: no task-roger-* state,
    # no gen<pid>@host sender that Flower would list as a worker.
    about_jobs = [e for e in received if e.get("uuid") in {first.id, second.id, buried.id}]
    assert not [e for e in about_jobs if e["type"].startswith("task-roger-")]
    senders = {e["hostname"] for e in about_jobs}
    assert len(senders) == 1 and not next(iter(senders)).startswith("gen"), senders


def test_dashboard_refuses_a_flower_url_that_is_not_http(redis_url, run):
    proc = subprocess.run([sys.executable, "-m", "celery", "-A", "roger_app", "roger",
                           "dashboard", "--port", str(free_port()), "--flower-url",
                           "javascript:alert(1)"], cwd=APPS, env=cli_env(redis_url, run),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "--flower-url must be an http:// or https:// URL" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_cli_is_registered_with_celery():
    from importlib.metadata import entry_points

    names = {ep.name: ep.value for ep in entry_points(group="celery.commands")}
    assert names.get("roger") == "celery_roger.cli:roger"
    assert Path(APPS).is_dir()
