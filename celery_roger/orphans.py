"""Orphaned queue keys: a confirmed key whose job is nowhere is released, and reported.

kombu's Redis transport pops a message before it records it as unacked; a worker killed
in that window loses the message, and its queue key would stay held for ever (a beat task
with ``on_duplicate="existing"`` would silently stop). So workers sweep: ``sweep_keys.lua``
walks the held queue keys a bounded step at a time (one worker per step, cluster-wide) and
returns the keys whose job has been nowhere in roger's state on two visits far enough
apart to release them within ``roger_orphaned_key_seconds``. Those jobs are then looked
for in the broker, its queue lists and its unacked messages, and a key is released only if
its job is not there either: a job in transit (published and not yet confirmed, popped
and not yet recorded, waiting its turn in a long queue) is never taken for lost.

On RabbitMQ there is no such window (a consumer's unacked messages return to the queue
when its channel closes), and a broker's queues cannot be read without consuming them:
the sweep is off there (see the README for what bounds a key on RabbitMQ).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from typing import Any

from celery import Celery

from . import events
from .keys import base_key

logger = logging.getLogger("celery_roger")

#: Queue keys looked at per sweep step.
STEP_KEYS = 1000
#: Messages read from a broker list per call.
CHUNK = 1000
_ID = re.compile(rb'"id": ?"([^"\\]+)"')


def step_seconds(bound: float) -> float:
    """How often a sweep step runs (somewhere in the cluster), for a release within
    ``bound`` seconds (``roger_orphaned_key_seconds``)."""
    return max(0.5, min(5.0, bound / 8))


def threshold_seconds(bound: float) -> float:
    """How long a suspect must have been nowhere before the broker check: the bound, less
    a first sighting, a second one, and the check (when a pass fits in one step)."""
    return max(bound / 4, bound - 3 * step_seconds(bound))


def on_redis_broker(app: Celery) -> bool:
    with app.connection_for_read() as conn:
        return conn.transport.driver_type == "redis"


def broker_job_ids(app: Celery, wanted: Iterable[str]) -> set[str]:
    """Which of ``wanted`` are in the Redis broker: in a queue list (any priority) or
    delivered and unacked. Reads every list of the broker's database, a chunk at a time."""
    wanted = set(wanted)
    found: set[str] = set()
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        client = channel.client
        for raw in client.hscan_iter(channel.unacked_key, count=CHUNK):
            found.update(_ids(raw[1], wanted))
        for key in client.scan_iter(count=CHUNK, _type="LIST"):
            start = 0
            while True:
                chunk = client.lrange(key, start, start + CHUNK - 1)
                for message in chunk:
                    found.update(_ids(message, wanted))
                if len(chunk) < CHUNK:
                    break
                start += CHUNK
    return found


def _ids(raw: Any, wanted: set[str]) -> set[str]:
    if isinstance(raw, str):
        raw = raw.encode()
    if not isinstance(raw, bytes):
        return set()
    return {i for m in _ID.finditer(raw) if (i := m.group(1).decode(errors="replace")) in wanted}


def check_suspects(app: Celery, store: Any, suspects: list[tuple[str, str, str]],
                   finish: Callable[[str, str], Any]) -> int:
    """Look for old suspects in the broker and act on those not there: a queue key is
    released, a promoted job lost in flight is published again, an execution key whose
    holder left nothing is handed on (``finish(job_id, execution_key)``). Returns how
    many were acted on."""
    if not suspects:
        return 0
    present = broker_job_ids(app, (job for _, job, _ in suspects))
    acted = 0
    bound = threshold_seconds(store.settings.orphaned_key_seconds)
    for kind, job_id, key in suspects:
        if job_id in present:
            store.orphan(kind, job_id, key, release=False)
            continue
        outcome = store.orphan(kind, job_id, key, release=True)
        if outcome == 0:
            continue
        acted += 1
        if kind == "e":
            # The sweep sees slots (execution_limit): ``E`` or ``E\0#i``; logs, events and
            # finish speak of the key.
            key = base_key(key)
        if outcome == 1:
            logger.error(
                "Released queue key %r: its job %s was nowhere (not in the broker, not "
                "running, parked, held or buried) for over %.0fs: it was lost in flight",
                key, job_id, bound)
            events.step(app, "orphaned", job_id, queue_key=key)
        elif outcome == 2:
            logger.error(
                "Job %s, handed execution key %r, was nowhere (not in the broker, not "
                "running) for over %.0fs: its message was lost in flight; it is published "
                "again", job_id, key, bound)
            events.step(app, "orphaned", job_id, execution_key=key)
        else:
            logger.error(
                "Execution key %r was held by job %s, which is nowhere and left nothing to "
                "publish again: the key goes to the next parked job", key, job_id)
            events.step(app, "orphaned", job_id, execution_key=key)
            finish(job_id, key)
    return acted
