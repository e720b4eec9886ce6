"""What happens when an attempt fails: retry after a delay, bury, or fail.

The decision is roger's sequence: a ``retryable`` job (or one that raised
``RetryableError``) with ``retry_count < len(retry_levels)`` is retried after
``retry_levels[retry_count]`` seconds (or the error's ``retry_after``); after the last
level it is buried; anything else fails at once. Retries wait in Redis and are published
by a worker's tick when due. Both the retry and the buried entry keep what is needed to
publish the job again as Celery would (same id, options and headers; the ``roger``
header's ``rc`` holds the retry count).
"""

from __future__ import annotations

import base64
import logging
import time
import traceback as tb
from dataclasses import dataclass
from typing import Any

from celery import Celery
from celery.app.task import Context
from kombu.serialization import loads, prepare_accept_content

from . import events
from .errors import RetryableError
from .job import HEADER, Job, job_header
from .publish import republish
from .runtime import runtime

logger = logging.getLogger("celery_roger")

# Message headers of Celery's task protocol 2: everything else is a user's own header.
PROTOCOL_HEADERS = frozenset((
    "lang", "task", "id", "shadow", "eta", "expires", "group", "group_index", "retries",
    "timelimit", "root_id", "parent_id", "argsrepr", "kwargsrepr", "origin", "ignore_result",
    "replaced_task_nesting", "stamped_headers", "stamps",
))


@dataclass(frozen=True)
class Decision:
    kind: str  # "retry", "bury", "fail", or "cancelled" (a retry refused: job cancelled)
    delay: float = 0.0


def decide(task: Any, retry_count: int, error: BaseException) -> Decision:
    explicit = isinstance(error, RetryableError)
    if not (explicit or getattr(task, "retryable", False)):
        return Decision("fail")
    levels = task.roger_retry_levels()
    if retry_count >= len(levels):
        return Decision("bury")
    if isinstance(error, RetryableError) and error.retry_after is not None:
        return Decision("retry", float(error.retry_after))
    return Decision("retry", float(levels[retry_count]))


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def format_traceback(error: BaseException) -> str | None:
    if error.__traceback__ is None:
        return None
    return "".join(tb.format_exception(type(error), error, error.__traceback__))


def publish_entry(task: Any, context: Any, header: dict[str, Any],
                  headers: dict[str, Any] | None = None) -> dict[str, Any]:
    """What is needed to publish this job again: Celery's own retry signature, as data.

    ``headers`` are the user's message headers when ``context`` lacks them (a worker's
    main process).
    """
    sig = task.signature_from_request(context)
    options = {k: v for k, v in sig.options.items()
               if v is not None and k not in ("countdown", "eta", "redelivered")}
    custom = dict(options.get("headers") or {})
    if headers is not None:
        custom.update({k: v for k, v in headers.items() if k not in PROTOCOL_HEADERS})
    custom[HEADER] = header
    options["headers"] = custom
    return {"task": task.name, "args": list(sig.args or ()), "kwargs": dict(sig.kwargs or {}),
            "options": options}


def send_entry(app: Celery, entry: dict[str, Any], *, retry_count: int | None = None) -> Any:
    """Publish a stored job (a due retry, a requeued buried job) through Celery."""
    options = dict(entry["options"])
    if retry_count is not None:
        headers = dict(options.get("headers") or {})
        headers[HEADER] = {**(headers.get(HEADER) or {}), "rc": retry_count}
        options["headers"] = headers
    send = runtime(app).original_send_task or app.send_task
    return send(entry["task"], entry["args"], entry["kwargs"], **options)


def publish_stored(app: Celery, stored: dict[str, Any]) -> None:
    """Publish a job kept in Redis: a captured message, or a retry/publish entry."""
    if "raw" in stored:
        republish(app, stored["raw"])
    else:
        send_entry(app, stored)


def job_from_stored(app: Celery, job_id: str, stored: dict[str, Any]) -> Job:
    """The Job view of a job kept in Redis (a captured message or a publish entry)."""
    raw = stored.get("raw") or (stored if "body" in stored else None)
    if raw is None:
        headers = (stored.get("options") or {}).get("headers") or {}
        return Job.from_header(job_id, stored.get("task", ""), stored.get("args"),
                               stored.get("kwargs"), job_header(headers), started_at=0.0)
    headers = raw.get("headers") or {}
    args, kwargs, _ = _body(app, job_id, raw)
    return Job.from_header(job_id, str(headers.get("task", "")), args, kwargs,
                           job_header(headers), queue=stored.get("queue", ""), started_at=0.0)


def request_from_stored(app: Celery, job_id: str, stored: dict[str, Any]) -> Context:
    """The request of a job kept in Redis, with what a result backend needs to count
    the job in its chord (group, group index, chord callback)."""
    raw = stored.get("raw") or (stored if "body" in stored else None)
    if raw is None:
        options = stored.get("options") or {}
        return Context(id=job_id, group=options.get("group_id"),
                       group_index=options.get("group_index"), chord=options.get("chord"))
    headers = raw.get("headers") or {}
    _, _, embed = _body(app, job_id, raw)
    return Context(id=job_id, group=headers.get("group"), group_index=headers.get("group_index"),
                   chord=embed.get("chord"))


def _body(app: Celery, job_id: str, raw: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    """(args, kwargs, embed) of a captured message; empty if it cannot be decoded."""
    try:
        body = loads(base64.b64decode(raw["body"]), raw["content_type"],
                     raw["content_encoding"],
                     accept=prepare_accept_content(app.conf.accept_content))
        if isinstance(body, (list, tuple)) and len(body) >= 2:
            embed = body[2] if len(body) > 2 and isinstance(body[2], dict) else {}
            return body[0], body[1], embed
    except Exception:
        logger.debug("could not decode the body of job %s", job_id, exc_info=True)
    return (), {}, {}


def record(task: Any, job: Job, context: Any, error: BaseException, traceback: str | None,
           *, headers: dict[str, Any] | None = None) -> Decision:
    """Decide what a failed attempt becomes and record a retry or burial in Redis.

    If Redis cannot record it, the job fails (FAILURE) and the error is logged.
    """
    decision = decide(task, job.retry_count, error)
    if decision.kind == "fail":
        return decision
    store = runtime(task.app).store
    try:
        entry = publish_entry(task, context, job.header(job.retry_count + 1), headers)
        if decision.kind == "retry":
            if not store.schedule_retry(job.id, decision.delay, entry):
                return Decision("cancelled")
            logger.info("Job %s[%s] failed (%s); retry %d in %ss", job.task, job.id,
                        describe(error), job.retry_count + 1, decision.delay)
            return decision
        buried = {
            "id": job.id, "task": job.task, "args": list(job.args), "kwargs": job.kwargs,
            "queue": job.queue, "queue_key": job.queue_key,
            "execution_key": job.execution_key, "retry_count": job.retry_count,
            "error": describe(error), "error_type": type(error).__name__,
            "traceback": traceback, "buried_at": time.time(), "publish": entry,
        }
        dropped = store.bury(job.id, job.queue, buried)
    except Exception:
        logger.exception("Job %s[%s]: could not record its %s in Redis; it fails instead",
                         job.task, job.id, decision.kind)
        return Decision("fail")
    logger.error("Job %s[%s] buried in queue %r after %d retries: %s", job.task, job.id,
                 job.queue, job.retry_count, describe(error))
    events.send(task.app, "buried", job.id, queue=job.queue, error=describe(error))
    if dropped:
        logger.error("Buried queue %r is over roger_buried_max=%d: dropped the %d oldest "
                     "(%s)", job.queue, store.settings.buried_max, len(dropped),
                     ", ".join(dropped))
    return decision
