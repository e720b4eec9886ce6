"""The operator CLI's traps (issue 15, point 5), run as an operator runs it: a real
``celery -A roger_app roger ...`` process against real workers.

A cancel says what roger knew of the job; destructive commands on every queue ask first
and refuse without a terminal; ``roger purge QUEUE`` removes a queue's jobs in the broker
and in roger, releasing their keys; contradictory options are refused."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import time
import uuid

import pytest

from celery_roger import Roger

from .conftest import APPS, broker_depth, events, wait_until


@pytest.fixture
def roger(app_module):
    return Roger(app_module.app)


def _cmd(args):
    return [sys.executable, "-m", "celery", "-A", "roger_app", "roger", *args]


@pytest.fixture
def cli(redis_url, run):
    """``cli(*args, ok=True, answer=None, more_env=None)``: the CLI, its stdin not a
    terminal; with ``answer``, a terminal on which ``answer`` is typed."""
    env = {**os.environ, "ROGER_TEST_REDIS_URL": redis_url, "ROGER_TEST_QUEUE": f"q-{run}",
           "PYTHONPATH": os.pathsep.join([str(APPS), os.environ.get("PYTHONPATH", "")])}

    def call(*args, ok=True, answer=None, more_env=None):
        env_ = {**env, **(more_env or {})}
        if answer is None:
            proc = subprocess.run(_cmd(args), cwd=APPS, env=env_, capture_output=True,
                                  text=True, timeout=60, stdin=subprocess.DEVNULL)
        else:
            master, slave = pty.openpty()
            try:
                os.write(master, answer.encode())
                proc = subprocess.run(_cmd(args), cwd=APPS, env=env_, capture_output=True,
                                      text=True, timeout=60, stdin=slave)
            finally:
                os.close(slave)
                os.close(master)
        assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
        assert (proc.returncode == 0) == ok, (proc.returncode, proc.stdout, proc.stderr)
        return proc
    return call


def one_error(proc) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def attempts(r, run):
    return [e["name"] for e in events(r, run, "attempt")]


def test_cancel_says_what_roger_knew(app_module, run, r, roger, cli, worker):
    unknown, finished = f"{run}-not-an-id", str(uuid.uuid4())
    app_module.app.backend.store_result(finished, "x", "SUCCESS")
    queued = app_module.fragile.delay(run, "queued")  # no keys: roger has no record of it
    assert broker_depth(app_module.app, f"q-{run}") == 1
    lines = cli("cancel", unknown, finished, queued.id).stdout.splitlines()
    assert lines[0].startswith(f"{unknown} is unknown to roger: the cancellation is stored")
    assert lines[1] == f"{finished} had already finished (SUCCESS): nothing to cancel"
    assert lines[2].startswith(f"{queued.id} is unknown to roger") and "broker" in lines[2]
    assert roger.job(unknown)["state"] == "cancelled"
    # A result backend it cannot reach does not fail the cancel.
    nowhere = {"ROGER_TEST_SETTINGS": json.dumps({"result_backend": "redis://127.0.0.1:1/0"})}
    line = cli("cancel", f"{run}-other", more_env=nowhere).stdout.strip()
    assert line.startswith(f"{run}-other is unknown to roger: the cancellation is stored")
    assert roger.job(f"{run}-other")["state"] == "cancelled"
    # What it said is true: the job waiting in the broker is dropped when delivered.
    worker()
    wait_until(lambda: queued.state == "REVOKED", timeout=20, what="the queued job's drop")
    assert attempts(r, run) == []
    assert cli("cancel", queued.id).stdout.strip() == f"{queued.id} was already cancelled"
    # A running job: as before.
    running = app_module.fragile.delay(run, "running", "sleep", 30)
    wait_until(lambda: attempts(r, run), timeout=20, what="the job to start")
    assert cli("cancel", running.id).stdout.strip() == f"cancelled {running.id} (running)"


def test_destructive_commands_on_every_queue_ask_first(app_module, run, roger, cli, worker):
    queue = f"q-{run}"
    worker()
    app_module.once.delay(run, "b", "fail")
    wait_until(lambda: roger.buried(queue), timeout=20, what="a burial")
    # No terminal to ask on, no --yes: refused, nothing deleted.
    error = one_error(cli("purge-buried", ok=False))
    assert "--yes" in error and "nothing was deleted" in error
    assert len(roger.buried(queue)) == 1
    # Asked on a terminal: "n" keeps them, "y" deletes them.
    proc = cli("purge-buried", ok=False, answer="n\n")
    assert "every queue" in proc.stdout and "nothing was deleted" in one_error(proc)
    assert len(roger.buried(queue)) == 1
    assert cli("purge-buried", answer="y\n").stdout.split()[-2] == "purged"
    assert roger.buried(queue) == []
    # --yes goes ahead without asking; with a QUEUE nothing is asked (as before).
    app_module.once.delay(run, "c", "fail")
    wait_until(lambda: roger.buried(queue), timeout=20, what="a second burial")
    assert cli("purge-buried", "--yes").stdout.strip().startswith("purged ")
    assert roger.buried(queue) == []
    assert cli("purge-buried", queue).stdout.strip() == "purged 0"


def test_purge_removes_a_queues_jobs_everywhere_and_releases_their_keys(
        app_module, run, r, roger, cli, worker):
    queue, key = f"q-{run}", f"{run}:ek"
    store = roger.store
    w = worker()
    holder = app_module.fragile.apply_async((run, "holder", "sleep", 60), execution_key=key)
    wait_until(lambda: attempts(r, run), timeout=20, what="the holder to start")
    qks = {name: f"{run}:{name}" for name in ("p0", "p1", "retry", "held", "b0", "b1")}
    for name in ("p0", "p1"):  # parked behind the holder
        app_module.fragile.apply_async((run, name), execution_key=key, queue_key=qks[name])
    wait_until(lambda: len(store.parked_ids(key)) == 2, timeout=10, what="parking")
    retry = app_module.retrying.apply_async((run, "retry", "ask60"), queue_key=qks["retry"])
    wait_until(lambda: roger.job(retry.id)["state"] == "retrying", timeout=10,
               what="a waiting retry")
    store.pause(queue, None)  # paused in Redis only: the worker still receives, and holds
    app_module.fragile.apply_async((run, "held"), queue_key=qks["held"])
    wait_until(lambda: store.held_count(queue) == 1, timeout=10, what="a held job")
    roger.pause(queue)  # now the worker stops consuming: what follows waits in the broker

    def applied():
        replies = app_module.app.control.inspect(destination=[w.nodename], timeout=2)
        return queue in ((replies._request("roger") or {}).get(w.nodename) or {}).get(
            "paused_applied", [])

    wait_until(applied, timeout=10, what="the worker to apply the pause")
    for name in ("b0", "b1"):
        app_module.fragile.apply_async((run, name), queue_key=qks[name])
    app_module.fragile.delay(run, "keyless")
    wait_until(lambda: broker_depth(app_module.app, queue) == 3, timeout=10,
               what="three jobs in the broker")

    # Without --yes and without a terminal: refused, nothing removed.
    assert "--yes" in one_error(cli("purge", queue, ok=False))
    assert broker_depth(app_module.app, queue) == 3 and len(store.parked_ids(key)) == 2

    out = cli("purge", queue, "--yes").stdout.strip()
    assert out == (f"purged {queue}: 3 in the broker, 2 parked, 1 held (paused), "
                   "1 waiting retries")
    assert broker_depth(app_module.app, queue) == 0
    assert store.parked_ids(key) == [] and store.held_count(queue) == 0
    assert roger.info()["queues"][queue]["parked"] == 0
    assert roger.job(retry.id)["state"] != "retrying"
    assert {n: store.queue_key_holder(k) for n, k in qks.items()} == dict.fromkeys(qks)
    # Purging again finds nothing; the API gives the same counts.
    assert roger.purge(queue) == {"broker": 0, "parked": 0, "held": 0, "retrying": 0}

    # None of the purged jobs ever runs: the holder ends, its key is free, nothing follows.
    roger.resume(queue)
    roger.cancel(holder.id)
    wait_until(lambda: store.execution_key_holder(key) is None, timeout=15,
               what="the execution key to be free")
    time.sleep(1.5)
    assert attempts(r, run) == ["holder", "retry"]


def test_purge_of_a_queue_the_broker_never_declared(run, cli):
    out = cli("purge", f"q-{run}-never", "--yes", "--json").stdout
    assert '"broker": 0' in out and '"parked": 0' in out


@pytest.mark.parametrize("args", [
    ("requeue", "{job}", "--all", "--queue", "{queue}"),
    ("requeue", "{job}", "--queue", "{queue}"),
    ("requeue", "{job}", "--all"),
    ("keys", "--release", "{qk}", "--prefix", "{run}"),
    ("keys", "--release", "{qk}", "--limit", "5"),
    ("keys", "--release", "{qk}", "--json"),
])
def test_contradictory_options_are_refused(app_module, run, roger, cli, args):
    qk = f"{run}:qk"
    job = app_module.fragile.apply_async((run, "a"), queue_key=qk)  # no worker: it waits
    values = {"job": job.id, "queue": f"q-{run}", "qk": qk, "run": run}
    error = one_error(cli(*(a.format(**values) for a in args), ok=False))
    assert "cannot be used together" in error
    assert roger.store.queue_key_holder(qk) == job.id, "nothing was done"


def test_bad_arguments_do_nothing(app_module, run, roger, cli):
    job = app_module.fragile.delay(run, "a")
    error = one_error(cli("cancel", job.id, "", ok=False))
    assert "job id cannot be empty" in error
    assert roger.job(job.id)["state"] == "queued-or-unknown", "no id of the call cancelled"
    assert "queue name cannot be empty" in one_error(cli("purge", "", "--yes", ok=False))
