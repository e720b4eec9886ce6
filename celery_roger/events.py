"""Roger's transitions as Celery events, truthful in Flower (SPEC section 8).

Celery's event state ranks any custom task state above RECEIVED, STARTED and REVOKED, so
a ``task-roger-*`` state would stick on a job and lie. Therefore:

* a job's final states are Celery's own task events: a cancelled job is ``task-revoked``
  (``revoked``), a buried job is Celery's ``task-failed`` whose exception text starts
  with ``Buried:`` (``buried_exception``, used by the worker's request class);
* roger's non-final steps are non-task events ``roger-<step>`` (``step``): they carry the
  job's ``uuid``, the sender's ``hostname`` and the step's fields, and leave Celery's and
  Flower's task states alone;
* only workers send task events, under their own node name (never a ``gen<pid>@host``
  name that Flower would list as a phantom worker). A pool process knows its worker's
  name from before the fork (``set_worker``).

Switches: in a worker, ``worker_send_task_events`` (``celery worker -E``); elsewhere (a
publisher's ``roger-deduplicated``, the CLI's or the dashboard's ``roger-requeued``),
``task_send_sent_event``, Celery's own switch for publisher events. An event that cannot
be sent is logged at debug level and changes nothing.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

from celery import Celery

logger = logging.getLogger("celery_roger")

#: The non-final steps, sent as ``roger-<step>``.
STEPS = ("deduplicated", "parked", "promoted", "held", "requeued", "orphaned", "replaced")

#: What a buried job's ``task-failed`` exception text starts with.
BURIED_PREFIX = "Buried: "

#: The node name of the worker this process belongs to, per app (set at worker_init,
#: inherited by its pool processes).
_workers: weakref.WeakKeyDictionary[Celery, str] = weakref.WeakKeyDictionary()


def set_worker(app: Celery, hostname: str) -> None:
    """This process is (or will fork the pool of) worker ``hostname``."""
    _workers[app] = hostname


def worker_hostname(app: Celery) -> str | None:
    return _workers.get(app)


def step(app: Celery, kind: str, job_id: str, **fields: Any) -> None:
    """A non-final roger step of job ``job_id``: the event ``roger-<kind>``."""
    if kind not in STEPS:
        raise ValueError(f"unknown roger step {kind!r}")
    hostname = worker_hostname(app)
    on = app.conf.worker_send_task_events if hostname else app.conf.task_send_sent_event
    if on:
        _send(app, f"roger-{kind}", hostname, uuid=job_id, **fields)


def revoked(app: Celery, job_id: str, *, terminated: bool = False,
            signum: int | None = None) -> None:
    """A cancelled job, as Celery reports a revoked one (workers only)."""
    hostname = worker_hostname(app)
    if hostname and app.conf.worker_send_task_events:
        _send(app, "task-revoked", hostname, uuid=job_id, terminated=terminated,
              signum=signum, expired=False)


def buried_exception(text: str) -> str:
    """The exception text of a buried job's ``task-failed``."""
    return text if text.startswith(BURIED_PREFIX) else BURIED_PREFIX + text


def _send(app: Celery, event_type: str, hostname: str | None, **fields: Any) -> None:
    try:
        with app.events.default_dispatcher(hostname=hostname) as dispatcher:
            dispatcher.send(event_type, **fields)
    except Exception:
        logger.debug("could not send %s for %s", event_type, fields.get("uuid"),
                     exc_info=True)
