"""Flower sees roger truthfully (SPEC section 8), checked with a real Flower process.

Roger's jobs go through dedup, park and promote, cancel (parked and running), burial and a
paused queue, on a real worker with task events on; then Flower's own API must show:
Celery's true states (the promoted job SUCCESS, cancelled jobs REVOKED, the buried job
FAILURE with ``Buried:`` in its exception, the held job SUCCESS after the resume), every
job under the real worker's name, no phantom ``gen<pid>@host`` worker anywhere (its
workers page, its ``/metrics`` labels), and nothing about a refused publish on its holder.

``ROGER_FLOWER_SCREENSHOTS=DIR`` also saves Flower's task list and a buried job's page as
PNGs in DIR (headless Chromium), for docs/.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from celery_roger import DuplicateJob, Roger
from celery_roger.testing import free_port

from .conftest import APPS, wait_until


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read().decode())


def get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def _up(url: str) -> bool:
    try:
        return urllib.request.urlopen(url, timeout=2).status == 200
    except OSError:
        return False


@pytest.fixture
def flower(redis_url, run, tmp_path):
    """A real Flower on this run's app, its API open (FLOWER_UNAUTHENTICATED_API)."""
    port = free_port()
    log = open(tmp_path / "flower.log", "w")  # noqa: SIM115
    env = {**os.environ, "ROGER_TEST_REDIS_URL": redis_url, "ROGER_TEST_QUEUE": f"q-{run}",
           "FLOWER_UNAUTHENTICATED_API": "true",
           "PYTHONPATH": os.pathsep.join([str(APPS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "roger_app", "flower",
                             "--address=127.0.0.1", f"--port={port}"], cwd=APPS, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: proc.poll() is None and _up(base + "/healthcheck"), timeout=30,
                   what=f"Flower on {base} (log: {tmp_path / 'flower.log'})")
        yield base
    finally:
        proc.terminate()
        proc.wait(15)


def test_flower_shows_roger_jobs_truthfully(app_module, run, worker, flower):
    roger = Roger(app_module.app)
    w = worker(concurrency=3, extra_args=["-E"])
    # Flower's event receiver must be listening before the jobs run: a first job that
    # Flower has seen end proves it.
    warm = app_module.fragile.delay(run, "warm")
    warm.get(timeout=20)
    wait_until(lambda: _state(flower, warm.id) == "SUCCESS", timeout=20,
               what="Flower to see a first job")

    fragile, once = app_module.fragile, app_module.once
    # dedup: the holder runs, a second publish of its queue key is refused
    qk = f"{run}:qk"
    holder = fragile.apply_async((run, "holder", "sleep", 1.0), queue_key=qk)
    refused_id = f"{run}-refused"
    with pytest.raises(DuplicateJob) as refused:
        fragile.apply_async((run, "again"), queue_key=qk, task_id=refused_id)
    assert refused.value.existing_id == holder.id
    # park and promote: b waits for a, then runs; c is parked, then cancelled
    ek = f"{run}:ek"
    a = fragile.apply_async((run, "a", "sleep", 2.0), execution_key=ek)
    b = fragile.apply_async((run, "b"), execution_key=ek)
    c = fragile.apply_async((run, "c"), execution_key=ek)
    wait_until(lambda: roger.job(c.id)["state"] == "parked", timeout=20, what="c parked")
    roger.cancel(c.id)
    # a running job, cancelled
    long = fragile.apply_async((run, "long", "sleep", 30.0))
    wait_until(lambda: roger.job(long.id)["state"] == "running", timeout=20,
               what="the long job running")
    roger.cancel(long.id)
    # buried: retried once, then buried
    buried = once.delay(run, "buried", "fail")
    # published while its queue is paused: it waits (in the broker), runs after the resume
    roger.pause(f"q-{run}")
    held = fragile.delay(run, "held")
    wait_until(lambda: "paused" in roger.job(held.id)["explanation"], timeout=20,
               what=f"the paused job waiting: {roger.job(held.id)}")
    roger.resume(f"q-{run}")

    for job in (holder, a, b, held):
        assert job.get(timeout=30) is not None
    wait_until(lambda: roger.buried(f"q-{run}"), timeout=20, what="the burial")

    expected = {holder.id: "SUCCESS", a.id: "SUCCESS", b.id: "SUCCESS", held.id: "SUCCESS",
                c.id: "REVOKED", long.id: "REVOKED", buried.id: "FAILURE"}
    wait_until(lambda: all(_state(flower, j) == s for j, s in expected.items()), timeout=30,
               what="Flower's states to settle: "
                    + json.dumps({j: _state(flower, j) for j in expected}))

    tasks = get_json(f"{flower}/api/tasks?limit=1000")
    assert isinstance(tasks, dict)
    for job_id in expected:
        assert tasks[job_id]["worker"] == w.nodename, (job_id, tasks[job_id])
    assert tasks[buried.id]["exception"].startswith("Buried: "), tasks[buried.id]
    assert "RuntimeError" in tasks[buried.id]["exception"]
    # the refused publish is nobody's state: not a task in Flower, not on its holder
    assert refused_id not in tasks
    assert "DEDUPLICATED" not in json.dumps(tasks)
    revoked = get_json(f"{flower}/api/tasks?state=REVOKED&limit=1000")
    assert {c.id, long.id} <= set(revoked), sorted(revoked)
    found = get_json(f"{flower}/api/tasks?search=Buried&limit=1000")
    assert buried.id in found, sorted(found)

    # no phantom worker: Flower's workers are the real one only, and so are /metrics labels
    workers = get_json(f"{flower}/workers?json=1")
    names = {entry["hostname"] for entry in workers["data"]}
    assert names == {w.nodename}, names
    labels = set(re.findall(r'worker="([^"]+)"', get_text(f"{flower}/metrics")))
    assert labels <= {w.nodename}, labels

    if shots := os.environ.get("ROGER_FLOWER_SCREENSHOTS"):
        _screenshots(flower, Path(shots), buried.id)


def _state(flower: str, job_id: str) -> str | None:
    try:
        info = get_json(f"{flower}/api/task/info/{job_id}")
    except OSError:
        return None
    return info.get("state") if isinstance(info, dict) else None


def _screenshots(flower: str, into: Path, job_id: str) -> None:
    from .test_dashboard_browser import chromium

    into.mkdir(parents=True, exist_ok=True)
    driver = chromium(1400, 900)
    try:
        driver.get(f"{flower}/tasks")
        wait_until(lambda: job_id in driver.page_source, timeout=20, what="the task list")
        driver.save_screenshot(str(into / "flower-tasks.png"))
        driver.set_window_size(1400, 1500)  # down to the exception
        driver.get(f"{flower}/task/{job_id}")
        wait_until(lambda: "Buried: " in driver.page_source, timeout=20, what="the task page")
        driver.save_screenshot(str(into / "flower-task-buried.png"))
    finally:
        driver.quit()
