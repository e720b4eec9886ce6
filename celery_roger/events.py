"""Roger transitions as Celery task events, so Flower shows them in a job's history.

``task-roger-deduplicated``, ``-parked``, ``-promoted``, ``-cancelled``, ``-buried``,
``-requeued`` and ``-orphaned`` (the queue key of a job lost in flight was released), with
``uuid`` the job id. They are sent when the process has task events on
(``worker_send_task_events``, which ``celery worker -E`` sets); an event that cannot be
sent is logged at debug level and changes nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery

logger = logging.getLogger("celery_roger")

TYPES = ("deduplicated", "parked", "promoted", "cancelled", "buried", "requeued", "orphaned")


def send(app: Celery, kind: str, job_id: str, **fields: Any) -> None:
    if kind not in TYPES:
        raise ValueError(f"unknown roger event {kind!r}")
    if not app.conf.worker_send_task_events:
        return
    try:
        with app.events.default_dispatcher() as dispatcher:
            dispatcher.send(f"task-roger-{kind}", uuid=job_id, **fields)
    except Exception:
        logger.debug("could not send task-roger-%s for %s", kind, job_id, exc_info=True)
