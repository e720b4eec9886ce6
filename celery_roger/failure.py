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
import dataclasses
import logging
import threading
import time
import traceback as tb
import weakref
from dataclasses import dataclass
from typing import Any

from celery import Celery
from celery.app.task import Context
from kombu.serialization import loads, prepare_accept_content

from .errors import RetryableError, WrongPartition
from .job import HEADER, Job, job_header, job_partition
from .publish import republish, republishing
from .records import StoredJob
from .runtime import Runtime, runtime
from .store import Store

logger = logging.getLogger("celery_roger")

# Message headers of Celery's task protocol 2: everything else is a user's own header.
PROTOCOL_HEADERS = frozenset((
    "lang", "task", "id", "shadow", "eta", "expires", "group", "group_index", "retries",
    "timelimit", "root_id", "parent_id", "argsrepr", "kwargsrepr", "origin", "ignore_result",
    "replaced_task_nesting", "stamped_headers", "stamps",
))


@dataclass(frozen=True)
class Decision:
    #: "retry", "bury", "fail", "cancelled" (a retry refused: job cancelled), or
    #: "unrecorded" (a retry or burial Redis could not record: the job goes back to its
    #: queue, to run again, rather than fail for good)
    kind: str
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
    return {"kind": "entry", "task": task.name, "args": list(sig.args or ()),
            "kwargs": dict(sig.kwargs or {}), "options": options}


def send_entry(app: Celery, entry: dict[str, Any], *, retry_count: int | None = None) -> Any:
    """Publish a stored job (a due retry, a requeued buried job) through Celery."""
    options = dict(entry["options"])
    if retry_count is not None:
        headers = dict(options.get("headers") or {})
        headers[HEADER] = {**(headers.get(HEADER) or {}), "rc": retry_count}
        options["headers"] = headers
    send = runtime(app).original_send_task or app.send_task
    with republishing(str(options.get("task_id") or "")):
        return send(entry["task"], entry["args"], entry["kwargs"], **options)


def publish_stored(app: Celery, stored: dict[str, Any]) -> None:
    """Publish a job kept in Redis: a captured message, or a retry/publish entry."""
    job = StoredJob.of(stored)
    if job.message is not None:
        republish(app, job.message)
    else:
        send_entry(app, job.entry or stored)


def job_from_stored(app: Celery, job_id: str, stored: dict[str, Any]) -> Job:
    """The Job view of a job kept in Redis (a captured message or a publish entry)."""
    raw = StoredJob.of(stored).message
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
    raw = StoredJob.of(stored).message
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


#: The attribute that marks the exception a buried job's last attempt ended with.
BURIED_MARK = "roger_buried"


def mark_buried(exc: BaseException, job_id: str) -> None:
    """Mark ``exc`` as the end of buried job ``job_id`` (the mark pickles with the
    exception; it names the job, so a shared exception instance marks no other job)."""
    try:
        setattr(exc, BURIED_MARK, job_id)
    except Exception:  # an exception class that takes no attributes: see is_buried
        logger.debug("cannot mark %r as buried", exc)


def is_buried(task: Any, exc: BaseException, job_id: str) -> bool:
    """Whether the failure ``exc`` of job ``job_id`` buried it: its mark, or, for a
    retryable task whose exception lost it (Celery replaces an exception that does not
    pickle back), the buried record in Redis."""
    mark = getattr(exc, BURIED_MARK, None)
    if isinstance(mark, str):
        return mark == job_id
    if not getattr(task, "retryable", False):
        return False
    try:
        return runtime(task.app).store.is_buried(job_id)
    except Exception:
        return False


def record(task: Any, job: Job, context: Any, error: BaseException, traceback: str | None,
           *, headers: dict[str, Any] | None = None) -> Decision:
    """Decide what a failed attempt becomes and record a retry or burial in Redis.

    If Redis cannot record it, the decision is "unrecorded" (logged): the caller sends the
    job back to its queue, so a retryable job is never lost to an outage.
    """
    decision = decide(task, job.retry_count, error)
    if decision.kind == "fail":
        return decision
    store = runtime(task.app).store
    try:
        entry = publish_entry(task, context,
                              job.header(job.retry_count + 1, store.partition), headers)
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
            "kind": "buried",
        }
        dropped = store.bury(job.id, job.queue, buried)
    except Exception:
        logger.exception("Job %s[%s]: could not record its %s in Redis; it goes back to its "
                         "queue to run again", job.task, job.id, decision.kind)
        return Decision("unrecorded")
    logger.error("Job %s[%s] buried in queue %r after %d retries: %s", job.task, job.id,
                 job.queue, job.retry_count, describe(error))
    if dropped:
        logger.error("Buried queue %r is over roger_buried_max=%d: dropped the %d oldest "
                     "(%s)", job.queue, store.settings.buried_max, len(dropped),
                     ", ".join(dropped))
    return decision


# -- a job delivered to a worker of another partition -----------------------------------

#: Stores of other partitions than an app's own, per app (by its roger runtime): only
#: used to release the keys of jobs refused for their partition. A few at most.
_other_stores: weakref.WeakKeyDictionary[Runtime, dict[str, Store]] = \
    weakref.WeakKeyDictionary()
_other_stores_lock = threading.Lock()
MAX_OTHER_PARTITIONS = 16


def partition_store(app: Celery, partition: str) -> Store | None:
    """The store of ``partition`` in the app's roger Redis (cached), or None for a name
    that is not a partition (empty, or with braces)."""
    rt = runtime(app)
    if partition == rt.settings.partition:
        return rt.store
    if not partition or "{" in partition or "}" in partition:
        return None
    with _other_stores_lock:
        stores = _other_stores.setdefault(rt, {})
        store = stores.get(partition)
        if store is None:
            if len(stores) >= MAX_OTHER_PARTITIONS:
                stores.pop(next(iter(stores)))
            store = stores[partition] = Store(dataclasses.replace(rt.settings,
                                                                  partition=partition))
        return store


def refuse_wrong_partition(app: Celery, request: Any, partition: str) -> bool:
    """Refuse a delivered job published in another roger partition than ``partition``
    (this worker's); returns whether it was refused (the caller acks its message).

    The job never runs here: its keys and state belong to the other partition. Its keys
    are released there (handing its execution key on if it held it) and its state becomes
    ``FAILURE(WrongPartition)``, counted in its chord and passed to its ``link_error``.
    No callback runs (this worker's callbacks are its own partition's). A job whose header
    names no partition (published by an older version) is not refused.
    """
    published_in = job_partition(request.request_dict)
    if published_in is None or published_in == partition:
        return False
    error = WrongPartition(published_in, partition, request.name)
    logger.error("Job %s[%s] %s: it fails without running (check roger_partition of its "
                 "publisher and of the workers consuming queue %r)", request.name,
                 request.id, error, (request.delivery_info or {}).get("routing_key"))
    context = getattr(request, "_roger_context", None)
    context = context() if callable(context) else Context(
        request.request_dict, args=request.args, kwargs=request.kwargs)
    try:  # as everywhere in roger: the result is stored, then the keys are released
        request.task.backend.mark_as_failure(request.id, error, request=context)
    except Exception:
        logger.exception("could not store FAILURE for job %s", request.id)
    header = job_header(request.request_dict)
    ek, qk = (v if isinstance(v := header.get(k), str) else "" for k in ("ek", "qk"))
    if ek or qk:
        _release_in(app, published_in, request.id, ek, qk)
    return True


def _release_in(app: Celery, partition: str, job_id: str, ek: str, qk: str) -> None:
    """Release a job's keys in ``partition`` (and publish the job its execution key goes
    to, if any); logged, never raised."""
    store = partition_store(app, partition)
    if store is None:
        logger.error("Job %s: %r is not a roger partition; its keys (%r, %r) are not "
                     "released", job_id, partition, qk, ek)
        return
    try:
        finished = store.finish(job_id, execution_key=ek, queue_key=qk)
        for promotion in (finished.promotion, finished.queue_promotion):
            if promotion is not None and not promotion.pushed:
                republish(app, promotion.message)
                store.confirm_promoted(promotion.job_id)
    except Exception:
        logger.exception("Job %s: could not release its keys in partition %r", job_id,
                         partition)
