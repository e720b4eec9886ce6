"""The Celery app the tests run in real workers. Configured from the environment."""

from __future__ import annotations

import json
import os
import signal
import time

import redis
from celery import Celery, bootsteps

from celery_roger import RetryableError, Roger, RogerTask, signals

URL = os.environ.get("ROGER_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")

# ROGER_TEST_BROKER runs the same tests with another broker (RabbitMQ); results and roger
# state stay in Redis.
app = Celery("roger_app", broker=os.environ.get("ROGER_TEST_BROKER") or URL, backend=URL)
app.conf.update(
    roger_redis_url=os.environ.get("ROGER_TEST_STATE_URL") or URL,
    broker_heartbeat=0,
    roger_publish_grace_seconds=float(os.environ.get("ROGER_TEST_GRACE", "60")),
    roger_partition=os.environ.get("ROGER_TEST_PARTITION", "test"),
    roger_lease_seconds=float(os.environ.get("ROGER_TEST_LEASE", "30")),
    task_default_queue=os.environ.get("ROGER_TEST_QUEUE", "roger-test"),
    worker_prefetch_multiplier=int(os.environ.get("ROGER_TEST_PREFETCH", "4")),
    broker_connection_retry_on_startup=True,
    result_expires=600,
    roger_callbacks=os.environ.get("ROGER_TEST_CALLBACKS", "roger_app.Recorder"),
    roger_buried_max=int(os.environ.get("ROGER_TEST_BURIED_MAX", "10000")),
)
# Any other settings, as a JSON object (tests/test_bad_input.py, tests/test_security.py).
app.conf.update(json.loads(os.environ.get("ROGER_TEST_SETTINGS") or "{}"))


class PromptShutdown(bootsteps.StartStopStep):
    """On RabbitMQ the worker's event loop may sleep 5 s between timers, and only then sees
    a SIGTERM: a short timer lets a test's warm shutdown begin at once."""

    requires = {"celery.worker.components:Hub"}

    def start(self, worker):
        if worker.hub is not None:
            worker.hub.call_repeatedly(0.5, lambda: None)


if app.conf.broker_url.startswith("amqp"):
    # A publish returns once RabbitMQ has the message: a queue depth read right after it
    # counts it (tests/conftest.py: broker_depth).
    app.conf.broker_transport_options = {"confirm_publish": True}
    app.steps["worker"].add(PromptShutdown)

if os.environ.get("ROGER_TEST_VISIBILITY"):
    # Redeliver unacked messages of a dead worker after this many seconds.
    app.conf.broker_transport_options = {
        "visibility_timeout": float(os.environ["ROGER_TEST_VISIBILITY"]),
        "unacked_restore_interval": 1, "unacked_restore_throttle": 1,
    }

if os.environ.get("ROGER_TEST_BEAT"):
    app.conf.beat_schedule = {
        "nightly": {"task": "roger_app.nightly", "schedule": 0.2},
    }

timeline = redis.Redis.from_url(URL)


def record(run: str, event: str, **fields: object) -> None:
    """Append an event to the test run's timeline (a Redis list the test reads)."""
    entry = {"event": event, "t": time.time(), "pid": os.getpid(), **fields}
    timeline.rpush(f"timeline:{run}", json.dumps(entry))


@app.task(base=RogerTask)
def step(run: str, name: str, duration: float = 0.0) -> str:
    """Record start and stop around ``duration`` seconds of work."""
    record(run, "start", name=name)
    time.sleep(duration)
    record(run, "stop", name=name)
    return name


@app.task(base=RogerTask, bind=True)
def paced(self, run: str, name: str, duration: float = 0.0) -> str:
    """``step`` that also records when its worker admitted it (a rate's start)."""
    record(run, "start", name=name, admitted=getattr(self.request, "roger_admitted_at", None))
    time.sleep(duration)
    record(run, "stop", name=name)
    return name


@app.task(base=RogerTask, queue_key=lambda run, n: f"{run}:num-{n}")
def square(run: str, n: int) -> int:
    """Roger's QueueKeyJob: the queue key is computed from the arguments."""
    record(run, "square", n=n)
    return n * n


@app.task(base=RogerTask, execution_key=lambda run, name, duration=0.0: f"{run}:serial")
def serial(run: str, name: str, duration: float = 0.0) -> str:
    """Every job of one run shares an execution key computed from the arguments."""
    return step(run, name, duration)


@app.task(base=RogerTask, bind=True)
def describe(self, run: str, name: str) -> None:
    """Record the delivery options this job ran with."""
    req = self.request
    record(run, "describe", name=name, custom=(req.headers or {}).get("custom"),
           timelimit=list(req.timelimit or ()), expires=str(req.expires),
           priority=(req.delivery_info or {}).get("priority"),
           routing_key=(req.delivery_info or {}).get("routing_key"))


@app.task(base=RogerTask, queue_key="nightly-report", on_duplicate="existing")
def nightly() -> str:
    """Sent by celery beat every tick; only one may be pending."""
    return "report"


@app.task
def plain(run: str, name: str) -> str:
    """A task without roger."""
    record(run, "plain", name=name)
    return name


class Recorder:
    """roger_callbacks: records every callback on the job's run timeline.

    A job whose kwargs hold ``raise_in=<callback name>`` makes that callback raise after
    recording itself. ``after_run`` also records whether, at that moment, the result was
    stored and the job's keys were released (SPEC section 7's order).
    """

    def _record(self, name: str, job, **fields: object) -> None:
        run = job.args[0] if job.args else "no-run"
        record(run, "cb", cb=name, job=job.id, name=job.args[1] if len(job.args) > 1 else None,
               rc=job.retry_count, queue=job.queue, qk=job.queue_key, ek=job.execution_key,
               started_at=job.started_at, queued_at=job.queued_at, **fields)
        if job.kwargs.get("raise_in") == name:
            raise RuntimeError(f"callback {name} fails on purpose")

    def before_run(self, partition, job):
        self._record("before_run", job, partition=partition)
        return f"state-{job.id}"

    def after_run(self, partition, job, result, state):
        store = Roger(app).store
        self._record(
            "after_run", job, result=result, state=state,
            stored=app.AsyncResult(job.id).state,
            qk_free=job.queue_key is None or store.queue_key_holder(job.queue_key) != job.id,
            ek_free=job.execution_key is None
            or store.execution_key_holder(job.execution_key) != job.id,
        )

    def on_error(self, partition, job, error, traceback, state):
        self._record("on_error", job, error=type(error).__name__, message=str(error),
                     traceback=traceback, state=state)

    def on_buried(self, partition, job, error, traceback, state):
        self._record("on_buried", job, error=type(error).__name__, traceback=traceback,
                     state=state)

    def on_cancel(self, partition, job):
        self._record("on_cancel", job)


def act(run: str, name: str, how: str = "ok", duration: float = 0.0, raise_in=None) -> str:
    """Behave as ``how`` says; every attempt is recorded, and counted per (run, name).

    ok | fail (always) | failN (the first N attempts) | crash (SIGKILL own process) |
    crashN | sleep (``duration``) | sleepN (sleep only the first N attempts) |
    askS (raise RetryableError(retry_after=S) on the first attempt)
    """
    n = timeline.incr(f"attempts:{run}:{name}")
    record(run, "attempt", name=name, n=n)

    def first(prefix: str) -> bool:
        rest = how[len(prefix):]
        return how.startswith(prefix) and (rest == "" or n <= int(rest))

    if first("fail"):
        raise RuntimeError(f"boom {name}")
    if first("crash"):
        os.kill(os.getpid(), signal.SIGKILL)
    if first("sleep"):
        time.sleep(duration)
    if how.startswith("ask") and n == 1:
        raise RetryableError("not yet", retry_after=float(how[3:]))
    record(run, "done", name=name, n=n)
    return name


@app.task(base=RogerTask, retryable=True, retry_levels=[1, 1, 1])
def retrying(run, name, how="ok", duration=0.0, raise_in=None):
    """Roger's retry_test job: retry_levels [1, 1, 1]."""
    return act(run, name, how, duration, raise_in)


@app.task(base=RogerTask, retryable=True, retry_levels=[0])
def once(run, name, how="ok", duration=0.0, raise_in=None):
    """Retried once at once, then buried."""
    return act(run, name, how, duration, raise_in)


@app.task(base=RogerTask)
def fragile(run, name, how="ok", duration=0.0, raise_in=None):
    """Not retryable: any failure is final."""
    return act(run, name, how, duration, raise_in)


@app.task(base=RogerTask, max_execution_time=1)
def limited(run, name, how="ok", duration=0.0, raise_in=None):
    """Roger's worker_timeout_test job: max_execution_time 1."""
    return act(run, name, how, duration, raise_in)


@app.task(base=RogerTask, max_execution_time=1, retryable=True, retry_levels=[0.2])
def limited_retry(run, name, how="ok", duration=0.0, raise_in=None):
    return act(run, name, how, duration, raise_in)


@app.task(base=RogerTask, retryable=True, retry_levels=[0],
          queue_key=lambda run, name, *a, **kw: f"{run}:q:{name}",
          execution_key=lambda run, name, *a, **kw: f"{run}:e")
def keyed(run, name, how="ok", duration=0.0, raise_in=None):
    """Both keys; retried once, then buried."""
    return act(run, name, how, duration, raise_in)


@app.task(base=RogerTask, retryable=True, retry_levels=[2],
          queue_key=lambda run, name, *a, **kw: f"{run}:q:{name}",
          execution_key=lambda run, name, *a, **kw: f"{run}:e")
def keyed_slow_retry(run, name, how="ok", duration=0.0, raise_in=None):
    """Both keys; one retry after 2 s."""
    return act(run, name, how, duration, raise_in)


@app.task(base=RogerTask, autoretry_for=(RuntimeError,),
          retry_kwargs={"max_retries": 1, "countdown": 0.2})
def celery_retry(run, name, how="ok", duration=0.0, raise_in=None):
    """Celery's own autoretry on a RogerTask."""
    return act(run, name, how, duration, raise_in)


def _signal(name):
    def receiver(sender, partition, job, **values):
        run = job.args[0] if job.args else "no-run"
        record(run, "signal", signal=name, task=sender.name, job=job.id,
               keys=sorted(set(values) - {"signal"}), state=values.get("state"))
    receiver.__name__ = f"record_{name}"
    return receiver


for _name in ("before_run", "after_run", "on_error", "on_buried"):
    getattr(signals, _name).connect(_signal(_name), weak=False)


# -- tests/test_canvas.py: chains, groups, chords and beat -----------------------------


@app.task(base=RogerTask)
def append(acc, run, name, duration=0.0):
    """A canvas link: records start/stop around ``duration`` seconds, returns acc + [name]."""
    step(run, name, duration)
    return [*acc, name]


@app.task(base=RogerTask)
def gate(run, name, timeout=30.0):
    """Runs until the test opens it (sets ``gate:<run>:<name>``), at most ``timeout`` s."""
    record(run, "start", name=name)
    deadline = time.monotonic() + timeout
    while not timeline.exists(f"gate:{run}:{name}") and time.monotonic() < deadline:
        time.sleep(0.02)
    record(run, "stop", name=name)
    return name


@app.task(base=RogerTask, bind=True, queue_key=lambda run, duration=0.0: f"{run}:beat",
          on_duplicate="existing")
def beat_report(self, run, duration=0.0):
    """Sent by celery beat (ROGER_TEST_BEAT_RUN); at most one pending per run."""
    record(run, "start", name=self.request.id)
    time.sleep(duration)
    record(run, "stop", name=self.request.id)


@app.task(base=RogerTask, queue_key=lambda run, duration=0.0: f"{run}:beat-strict")
def beat_strict(run, duration=0.0):
    """Like beat_report, with on_duplicate="raise"."""
    time.sleep(duration)


if os.environ.get("ROGER_TEST_BEAT_RUN"):
    # One entry: ROGER_TEST_BEAT_TASK(run, duration) every 0.3 s, with the apply_async
    # options in ROGER_TEST_BEAT_OPTIONS (JSON).
    app.conf.beat_schedule = {
        "canvas-beat": {
            "task": f"roger_app.{os.environ['ROGER_TEST_BEAT_TASK']}", "schedule": 0.3,
            "args": (os.environ["ROGER_TEST_BEAT_RUN"],
                     float(os.environ.get("ROGER_TEST_BEAT_DURATION", "0"))),
            "options": json.loads(os.environ.get("ROGER_TEST_BEAT_OPTIONS", "{}")),
        },
    }


# -- tests/test_trust.py: BaseExceptions raised by jobs ----------------------------------


class Abort(BaseException):
    """A BaseException that is not an Exception (as some libraries raise)."""


def interrupt(run, name, how):
    """Raise a BaseException on the first N attempts (every attempt without N), then
    succeed: ``cancelledN`` raises asyncio's CancelledError, ``abortN`` raises Abort."""
    import asyncio

    n = timeline.incr(f"attempts:{run}:{name}")
    record(run, "attempt", name=name, n=n)
    kind = how.rstrip("0123456789")
    if how == kind or n <= int(how[len(kind):]):
        raise asyncio.CancelledError(f"cancelled {name}") if kind == "cancelled" \
            else Abort(f"aborted {name}")
    record(run, "done", name=name, n=n)
    return name


@app.task(base=RogerTask, retryable=True, retry_levels=[0.2],
          queue_key=lambda run, name, *a, **kw: f"{run}:q:{name}",
          execution_key=lambda run, name, *a, **kw: f"{run}:e")
def interrupted(run, name, how="cancelled1", raise_in=None):
    """Retryable, both keys: retried once after 0.2 s, then buried."""
    return interrupt(run, name, how)


@app.task(base=RogerTask, queue_key=lambda run, name, *a, **kw: f"{run}:q:{name}",
          execution_key=lambda run, name, *a, **kw: f"{run}:e")
def interrupted_final(run, name, how="abort", raise_in=None):
    """Not retryable, both keys: any BaseException is final."""
    return interrupt(run, name, how)
