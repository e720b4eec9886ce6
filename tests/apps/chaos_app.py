"""The Celery app of the chaos soak (tests/test_chaos.py), configured from the environment.

Three Redis servers, each with one role, so that a fault of one leaves the others alone:

* ``ROGER_CHAOS_BROKER``: Celery's broker (the soak SIGSTOPs it: a broker stall);
* ``ROGER_CHAOS_STATE``: roger's state and Celery's results (``appendonly yes``; the soak
  restarts it);
* ``ROGER_CHAOS_TIMELINE``: the run's timeline, never faulted.

Every attempt records ``start`` before its body and ``end`` after it (``time.time()``:
the processes share the machine's clock, so intervals recorded by different processes
compare), with the job id, its execution key, pid and process group. Every callback
records a ``cb`` entry and then misbehaves as the job's spec asks (``slow``: sleeps longer
than the lease; ``raise``: RuntimeError; ``exit``: SystemExit), in worker processes only.
The worker's main process records each kill of a pool process (``kill``: a cancelled job
or a lease lost), right after the signal was sent.

A job's only argument is its spec: ``{"name", "ek", "d" (seconds of work), "fail" (attempts
that fail: 0, n, or -1 for all), "cb" ({callback name: "slow" | "raise" | "exit"})}``.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from typing import Any

import redis
from billiard import pool as billiard_pool
from celery import Celery

from celery_roger import RogerTask

BROKER = os.environ.get("ROGER_CHAOS_BROKER", "redis://127.0.0.1:6379/0")
STATE = os.environ.get("ROGER_CHAOS_STATE", BROKER)
TIMELINE = os.environ.get("ROGER_CHAOS_TIMELINE", STATE)
LEASE = float(os.environ.get("ROGER_CHAOS_LEASE", "4"))
VISIBILITY = float(os.environ.get("ROGER_CHAOS_VISIBILITY", "8"))
#: How long a "slow" callback sleeps: longer than the lease.
SLOW_CALLBACK = float(os.environ.get("ROGER_CHAOS_SLOW_CALLBACK", str(LEASE + 1.5)))
#: Callbacks misbehave only in workers (never in the soak's own publishing process).
IN_WORKER = os.environ.get("ROGER_CHAOS_IN_WORKER") == "1"
QUEUE = "chaos"
PARTITION = "chaos"
TIMELINE_KEY = "chaos:timeline"
RETRY_LEVELS = [0.3, 0.6]

app = Celery("chaos_app", broker=BROKER, backend=STATE)
app.conf.update(
    roger_redis_url=STATE,
    roger_partition=PARTITION,
    roger_lease_seconds=LEASE,
    roger_publish_grace_seconds=float(os.environ.get("ROGER_CHAOS_GRACE", "3")),
    roger_callbacks="chaos_app.ChaosCallbacks",
    roger_retry_levels=RETRY_LEVELS,
    # Queue keys of jobs lost in flight at a kill are released within this (the drain's
    # settle time covers it).
    roger_orphaned_key_seconds=float(os.environ.get("ROGER_CHAOS_ORPHANED", "8")),
    task_default_queue=QUEUE,
    worker_prefetch_multiplier=int(os.environ.get("ROGER_CHAOS_PREFETCH", "4")),
    broker_heartbeat=0,
    broker_connection_retry_on_startup=True,
    # unacked_mutex_expire: kombu restores unacked messages under a Redis lock that lasts
    # 300 s by default; a worker SIGKILLed while holding it (restores run on every poll
    # here) would hold every redelivery back for 5 minutes, past the soak's drain.
    broker_transport_options={"visibility_timeout": VISIBILITY,
                              "unacked_restore_interval": 1, "unacked_restore_throttle": 1,
                              "unacked_mutex_expire": 5},
    result_expires=3600,
    # The soak restarts the Redis that holds the results. Celery's result store reads the
    # stored state before writing it, outside its own retry; without this a job that
    # succeeded while the Redis was loading is stored as FAILURE(BusyLoadingError).
    result_backend_always_retry=True,
)

timeline = redis.Redis.from_url(TIMELINE)


def record(event: str, **fields: Any) -> None:
    entry = {"e": event, "pid": os.getpid(), "pgid": os.getpgrp(), **fields}
    entry.setdefault("t", time.time())
    timeline.rpush(TIMELINE_KEY, json.dumps(entry))


# -- the jobs ------------------------------------------------------------------------------


def act(task: Any, spec: dict[str, Any]) -> str:
    """One attempt: ``start``, ``d`` seconds of work, maybe a failure, ``end``."""
    request = task.request
    n = timeline.incr(f"chaos:attempts:{request.id}")
    attempt = f"{request.id}:{n}:{os.getpid()}"
    t = time.time()  # taken before the record: the body starts after it
    record("start", t=t, job=request.id, a=attempt, ek=spec.get("ek"), n=n)
    outcome = "ok"
    try:
        time.sleep(float(spec.get("d") or 0))
        fail = int(spec.get("fail") or 0)
        if fail < 0 or n <= fail:
            outcome = "fail"
            raise RuntimeError(f"chaos: {spec.get('name')} fails attempt {n} on purpose")
        return str(spec.get("name"))
    except BaseException as exc:
        if outcome == "ok":
            outcome = type(exc).__name__
        raise
    finally:
        record("end", job=request.id, a=attempt, ek=spec.get("ek"), n=n, outcome=outcome)


@app.task(base=RogerTask, bind=True, name="chaos.work")
def work(self, spec):
    """Not retryable: a failure is final (FAILURE)."""
    return act(self, spec)


@app.task(base=RogerTask, bind=True, name="chaos.flaky", retryable=True,
          retry_levels=RETRY_LEVELS)
def flaky(self, spec):
    """Retryable: retried after 0.3 s and 0.6 s, then buried."""
    return act(self, spec)


# -- the callbacks -------------------------------------------------------------------------


class ChaosCallbacks:
    """roger_callbacks: records each call, then misbehaves as the job's spec says."""

    def _call(self, name: str, job: Any, **fields: Any) -> Any:
        spec = job.args[0] if job.args and isinstance(job.args[0], dict) else {}
        how = (spec.get("cb") or {}).get(name) if IN_WORKER else None
        record("cb", cb=name, job=job.id, how=how, thread=threading.current_thread().name,
               **fields)
        if how == "slow":
            time.sleep(SLOW_CALLBACK)
        elif how == "raise":
            raise RuntimeError(f"chaos: callback {name} of {job.id} raises on purpose")
        elif how == "exit":
            raise SystemExit(f"chaos: callback {name} of {job.id} raises SystemExit")
        return None

    def before_run(self, partition, job):
        return self._call("before_run", job)

    def after_run(self, partition, job, result, state):
        self._call("after_run", job)

    def on_error(self, partition, job, error, traceback, state):
        self._call("on_error", job, error=type(error).__name__)

    def on_buried(self, partition, job, error, traceback, state):
        self._call("on_buried", job, error=type(error).__name__)

    def on_cancel(self, partition, job):
        self._call("on_cancel", job)


# -- the kills of pool processes, seen from the worker's main process ----------------------

_terminate_job = billiard_pool.Pool.terminate_job


def _recorded_terminate_job(self: Any, pid: int, sig: Any = None) -> Any:
    """billiard's kill of one pool process (Celery's terminate of a cancelled job, roger's
    kill when the lease is lost): recorded right after the signal was sent, so the
    timeline bounds the end of an attempt that never recorded one."""
    t0 = time.time()
    try:
        return _terminate_job(self, pid, sig)
    finally:
        with contextlib.suppress(Exception):  # the timeline never stops a kill
            record("kill", t=time.time(), t0=t0, child=pid, sig=str(sig))


if IN_WORKER:
    billiard_pool.Pool.terminate_job = _recorded_terminate_job
