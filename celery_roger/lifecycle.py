"""What happens at each transition of a job, in any process: an attempt's end (keys
released, the next parked job handed its execution key and published), due retries
published, crashes and cancellations reported.

The Celery adapters (``request``, ``receivers``, ``healer``, ``admission``) and the
operator surfaces (``api``) call these; they sit above the Redis layer (``store``) and the
publish path, and below every Celery adapter.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import Celery
from redis.exceptions import RedisError

from . import events
from .errors import WorkerCrashed
from .failure import publish_stored
from .job import Job, as_key, finite
from .publish import republish
from .runtime import healer_of, runtime
from .store import DueRetry, Promotion
from .values import as_key_or_none

logger = logging.getLogger("celery_roger")


#: Why a parked job was sent on (hand_off's log line): its execution slot was handed to
#: it, or, waiting on a rate, its window opened.
KEY_HANDED = "its execution key was handed to it"
RATE_OPENED = "its rate's window opened"


def hand_off(app: Celery, promotion: Promotion,
             why: str = KEY_HANDED) -> None:
    """Publish a promoted job; if that fails, a worker's tick publishes it later."""
    store = runtime(app).store
    if not promotion.pushed:  # else finish.lua pushed it to its queue itself
        try:
            republish(app, promotion.message)
        except Exception:
            logger.exception(
                "could not publish promoted job %s; it will be published again within %ss",
                promotion.job_id, store.settings.publish_grace_seconds,
            )
            return
        store.confirm_promoted(promotion.job_id)
    logger.info("Promoted job %s: %s", promotion.job_id, why)
    events.step(app, "promoted", promotion.job_id)


def finish_job(app: Celery, job_id: str, *, execution_key: str, queue_key: str,
               publish: Callable[[Promotion], None] | None = None,
               instance: str = "", outcome: str = "") -> bool:
    """End a job's attempt in roger state and start the next parked job, if any.

    ``publish`` publishes the promoted job (default: ``hand_off``, here and now);
    ``instance`` is the worker instance the attempt ran under (a stale attempt releases
    nothing); ``outcome``, how it ended, goes to its history. Returns whether the job was
    recorded as running (true for one caller per attempt).
    """
    finished = runtime(app).store.finish(job_id, execution_key=execution_key,
                                         queue_key=queue_key, instance=instance,
                                         outcome=outcome)
    for promotion in (finished.promotion, finished.queue_promotion):
        if promotion is None:
            continue
        if publish is None:
            hand_off(app, promotion)
        else:
            publish(promotion)
    return finished.was_running


def ended_as(attempt: Any, state: str) -> str:
    """How an attempt ended, as its history says it: ``succeeded``, ``failed``,
    ``failed, retrying``, ``failed, buried``, ``timed out``, ``cancelled``, or ``put back:
    queue paused``. ``attempt``: the task's ``Attempt`` (None: not known)."""
    if attempt is not None and attempt.cancelled:
        return "cancelled"
    if attempt is not None and attempt.paused:
        return "put back: queue paused"
    if state == "SUCCESS":
        return "succeeded"
    kind = getattr(getattr(attempt, "decision", None), "kind", "")
    failed = "timed out" if attempt is not None and attempt.timed_out else "failed"
    return {"retry": f"{failed}, retrying", "bury": f"{failed}, buried"}.get(kind, failed)


def finish_quietly(app: Celery, job_id: str, execution_key: str, queue_key: str, *,
                   publish: Callable[[Promotion], None] | None = None,
                   instance: Any = "", outcome: str = "") -> bool:
    try:
        return finish_job(app, job_id, execution_key=execution_key, queue_key=queue_key,
                          publish=publish, instance=as_key(instance), outcome=outcome)
    except Exception:
        logger.exception(
            "could not release the keys of job %s; its worker's lease frees them", job_id
        )
        return True


def report(app: Celery, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Run a report (callbacks) on the worker's callback threads, never in its event loop;
    here and now where there is no worker (a publisher, a test)."""
    healer = healer_of(app)
    if healer is not None:
        healer.reporter.submit(what, fn, *args, **kwargs)
    else:
        fn(*args, **kwargs)


def report_crash(app: Celery, info: dict[str, Any]) -> None:
    """Report (on_error, WorkerCrashed) an attempt whose worker died."""
    job_id = str(info.get("job"))
    task = app.tasks.get(str(info.get("task")))
    if task is None:
        return
    job = Job(id=job_id, task=task.name, args=tuple(info.get("args") or ()),
              kwargs=dict(info.get("kwargs") or {}), queue=str(info.get("queue") or ""),
              queue_key=as_key_or_none(info.get("qk")),
              execution_key=as_key_or_none(info.get("ek")),
              started_at=finite(info.get("admitted_at")) or 0.0)
    error = WorkerCrashed(f"worker {info.get('worker')} stopped renewing its lease")
    runtime(app).callbacks.emit(task, "on_error", job, None, error=error, traceback=None)


def report_cancelled(app: Celery, task: Any, job: Job, request: Any = None) -> None:
    """A cancelled job: REVOKED, a ``cancelled`` event, on_cancel."""
    backend = (task or app).backend
    try:
        backend.mark_as_revoked(job.id, "cancelled", request=request)
    except Exception:
        logger.exception("could not store REVOKED for job %s", job.id)
    events.revoked(app, job.id)
    runtime(app).callbacks.emit(task, "on_cancel", job)


def publish_due(app: Celery, due: list[DueRetry]) -> None:
    """Publish due retries (and resumed jobs), then confirm those that were published."""
    published = []
    store = runtime(app).store
    for item in due:
        try:
            publish_stored(app, item.entry)
        except Exception:
            logger.exception("could not publish job %s; trying again in %ss", item.job_id,
                             store.settings.publish_grace_seconds)
        else:
            published.append(item)
    try:
        store.confirm_retries(published)
    except RedisError as exc:
        logger.warning("roger: could not confirm published retries: %s", exc)
