"""Roger callbacks: an audit trail of every job's life, in a Redis list the demo reads."""

from __future__ import annotations

import json
import os
import time

import redis

from .celery_app import REDIS_URL

_redis = redis.Redis.from_url(REDIS_URL)
AUDIT_KEY = f"{os.environ.get('SHOP_PARTITION', 'shop')}:audit"


def _log(event: str, job, **fields) -> None:
    entry = {"t": time.time(), "event": event, "id": job.id, "task": job.task.split(".")[-1],
             "args": list(job.args), "retry": job.retry_count, **fields}
    _redis.rpush(AUDIT_KEY, json.dumps(entry, default=str))


class Audit:
    def before_run(self, partition, job):
        _log("start", job)
        return time.time()

    def after_run(self, partition, job, result, state):
        _log("done", job, seconds=round(time.time() - state, 2))

    def on_error(self, partition, job, error, traceback, state):
        _log("error", job, error=f"{type(error).__name__}: {error}")

    def on_buried(self, partition, job, error, traceback, state):
        _log("buried", job, error=f"{type(error).__name__}: {error}")

    def on_cancel(self, partition, job):
        _log("cancelled", job)
