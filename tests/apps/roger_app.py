"""The Celery app the tests run in real workers. Configured from the environment."""

from __future__ import annotations

import json
import os
import time

import redis
from celery import Celery

from celery_roger import RogerTask

URL = os.environ.get("ROGER_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")

app = Celery("roger_app", broker=URL, backend=URL)
app.conf.update(
    roger_redis_url=os.environ.get("ROGER_TEST_STATE_URL") or URL,
    roger_publish_grace_seconds=float(os.environ.get("ROGER_TEST_GRACE", "60")),
    roger_partition=os.environ.get("ROGER_TEST_PARTITION", "test"),
    roger_lease_seconds=float(os.environ.get("ROGER_TEST_LEASE", "30")),
    task_default_queue=os.environ.get("ROGER_TEST_QUEUE", "roger-test"),
    worker_prefetch_multiplier=int(os.environ.get("ROGER_TEST_PREFETCH", "4")),
    broker_connection_retry_on_startup=True,
    result_expires=600,
)

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
