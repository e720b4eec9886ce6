"""The publish side: queue-key dedup around Celery's ``send_task``, and republishing."""

from __future__ import annotations

import base64
import contextlib
import contextvars
import functools
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from celery import Celery
from celery.signals import before_task_publish
from celery.utils import uuid

from . import canvas, events
from .confirm import Hold, confirm, release, send_replacing
from .errors import DuplicateJob
from .expiry import expires_in, expires_option
from .fuse import FusedPublish, Refused, fusing
from .job import HEADER, is_roger_task
from .keys import (
    ON_DUPLICATE,
    KeySpec,
    OnDuplicate,
    execution_limit,
    queue_key_until,
    rate,
    validate,
)
from .kombu_guard import Delivery, after_flush, delivery
from .runtime import runtime

logger = logging.getLogger("celery_roger")

UNSET: Any = type("Unset", (), {"__repr__": lambda self: "UNSET"})()

#: The job id roger itself is publishing again in this thread (or task), if any: Celery's
#: retry of a running job (``RogerTask.retry``), a stored retry or a requeue
#: (``failure.send_entry``). Such a publish keeps the ``roger`` header it carries. It is
#: process memory, set only by roger's own code: nothing in a message or a publish's
#: options can set it, so a caller's ``roger`` header is never trusted.
_REPUBLISHING: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "celery_roger_republishing", default=None)

#: The job id whose queue key its caller has taken already, pending, for it (a Django
#: ``apply_async_on_commit``, celery_roger/django.py): its publish takes the long road,
#: whose take finds the key held by the same job and takes it again, then confirms it (the
#: fused script would see a "replay" and push nothing).
_KEY_TAKEN: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "celery_roger_key_taken", default=None)

@contextlib.contextmanager
def key_taken(job_id: str) -> Iterator[None]:
    """Within this block, a publish of ``job_id`` whose queue key it took before (pending)
    takes the long road: take the key again (same job: allowed), send, confirm."""
    token = _KEY_TAKEN.set(job_id)
    try:
        yield
    finally:
        _KEY_TAKEN.reset(token)


@contextlib.contextmanager
def republishing(job_id: str) -> Iterator[None]:
    """Within this block, a publish of ``job_id`` is roger's own publish of that job again:
    it is sent unchanged (its ``roger`` header kept, no key taken)."""
    token = _REPUBLISHING.set(job_id)
    try:
        yield
    finally:
        _REPUBLISHING.reset(token)


def roger_send_task(app: Celery, send: Callable) -> Callable:
    """``app.send_task`` that also takes ``queue_key``, ``execution_key``, ``on_duplicate``."""

    @functools.wraps(send)
    def send_task(name: str, args: Any = None, kwargs: Any = None, *,
                  queue_key: KeySpec = UNSET, execution_key: KeySpec = UNSET,
                  on_duplicate: OnDuplicate | None = None, **options: Any) -> Any:
        return publish(app, send, name, args, kwargs, options, queue_key=queue_key,
                       execution_key=execution_key, on_duplicate=on_duplicate)

    return send_task


def publish(app: Celery, send: Callable, name: str, args: Any, kwargs: Any,
            options: dict[str, Any], *, queue_key: Any, execution_key: Any,
            on_duplicate: str | None) -> Any:
    """Publish a job: keys validated, the queue key taken, roger's header written, the
    message sent, the queue key confirmed (or released if the send failed)."""
    task_id = options.get("task_id")
    if task_id and task_id == _REPUBLISHING.get():
        # Roger publishing a job again (Celery's retry of it, a stored retry): it keeps
        # the header it was first published with, and takes no key.
        return send(name, args, kwargs, **options)
    headers = _without_callers_header(name, options)
    task = app.tasks.get(name)
    until = options.pop("queue_key_until", None)
    limit = options.pop("execution_limit", None)
    rate_given, rate_key = options.pop("rate", UNSET), options.pop("rate_key", UNSET)
    if is_roger_task(task):
        queue_key, execution_key = task.roger_keys(
            tuple(args or ()), dict(kwargs or {}), queue_key=queue_key, execution_key=execution_key
        )
        rated = task.roger_rate(tuple(args or ()), dict(kwargs or {}), rate_key=rate_key,
                                rate=rate_given)
        on_duplicate = on_duplicate or task.on_duplicate
    else:
        queue_key = validate(name, "queue_key", None if queue_key is UNSET else queue_key)
        execution_key = validate(
            name, "execution_key", None if execution_key is UNSET else execution_key
        )
        rated = _rate_by_name(name, rate_given, rate_key)
        if queue_key is None and execution_key is None and rated is None:
            return send(name, args, kwargs, **options)
    on_duplicate = on_duplicate or runtime(app).settings.on_duplicate
    if on_duplicate not in ON_DUPLICATE:
        raise ValueError(
            f"{name}: on_duplicate must be one of {ON_DUPLICATE}, got {on_duplicate!r}"
        )
    # Read as Celery reads it, before anything is taken or sent: a bad one raises here.
    expires = expires_in(app, expires_option(task, options), name)
    until = queue_key_until(name, until if until is not None
                            else getattr(task, "queue_key_until", "end"))
    limit = execution_limit(name, limit if limit is not None
                            else getattr(task, "execution_limit", 1))

    task_id = options["task_id"] = task_id or uuid()
    options["headers"] = {**headers, HEADER: _header(
        app, name, args, kwargs, options, queue_key, execution_key, until, limit, rated)}
    if queue_key is None:
        return send(name, args, kwargs, **options)
    hold = Hold(expires, until if isinstance(until, float) else 0.0)
    if on_duplicate == "replace":
        return send_replacing(app, send, name, args, kwargs, options, queue_key, hold)
    if runtime(app).fuse.usable and _KEY_TAKEN.get() != task_id:
        return _send_fused(app, send, task, name, args, kwargs, options, queue_key, hold,
                           on_duplicate)
    holder = runtime(app).store.take_queue_key(queue_key, task_id)
    if holder is not None:
        return _duplicate(app, task, name, args, kwargs, options, queue_key, holder,
                          on_duplicate)
    return _send_holding(app, send, name, args, kwargs, options, queue_key, hold)


def _header(app: Celery, name: str, args: Any, kwargs: Any, options: dict[str, Any],
            queue_key: str | None, execution_key: str | None, until: str | float,
            limit: int, rated: tuple[str, tuple[int, int]] | None) -> dict[str, Any]:
    """The ``roger`` header of a job published now (see job.HEADER)."""
    job: dict[str, Any] = {"q": _queue_name(app, name, args, kwargs, options),
                           "at": time.time(), "p": runtime(app).settings.partition}
    if queue_key is not None:
        job["qk"] = queue_key
        if until == "start":
            job["qu"] = "start"
    if execution_key is not None:
        job["ek"] = execution_key
        if limit > 1:
            job["el"] = limit
    if rated is not None:
        job["rk"], job["rl"] = rated[0], list(rated[1])
    return job


def _rate_by_name(name: str, rate_given: Any, rate_key: Any) -> tuple[str, tuple[int, int]] | None:
    """A per-call rate of a job published by name (its task not registered here)."""
    limit = rate(name, None if rate_given is UNSET else rate_given)
    if limit is None:
        return None
    if rate_key is not UNSET and rate_key is not None and not isinstance(rate_key, str):
        raise TypeError(f"{name}: rate_key of a job sent by name must be a str, got "
                        f"{type(rate_key).__name__} {rate_key!r}")
    key = validate(name, "rate_key", None if rate_key is UNSET else rate_key)
    return key or name, limit


def _without_callers_header(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The caller's headers without a ``roger`` header: whatever a caller puts there (a
    dict included) is not trusted; roger writes its own, after validating the keys and
    taking the queue key."""
    headers = options.get("headers") or {}
    if HEADER not in headers:
        return headers
    given = headers[HEADER]
    if isinstance(given, dict):
        logger.warning("%s: headers[%r] given by the caller is ignored: roger writes its "
                       "own (use queue_key= and execution_key=)", name, HEADER)
    elif given is not None:
        logger.warning("%s: headers[%r] is not roger's header (%s); it is replaced", name,
                       HEADER, type(given).__name__)
    headers = {k: v for k, v in headers.items() if k != HEADER}
    options["headers"] = headers
    return headers


def _duplicate(app: Celery, task: Any, name: str, args: Any, kwargs: Any,
               options: dict[str, Any], queue_key: str, holder: str,
               on_duplicate: str) -> Any:
    """The queue key is taken by ``holder``: refuse this publish the way the caller asked."""
    # A step of the refused publish (its own id), never a state of the holder.
    events.step(app, "deduplicated", options["task_id"], holder=holder, queue_key=queue_key,
                name=name)
    if canvas.in_canvas(options):
        # Dependents wait on this job's own id: it is refused as a failure (canvas.py).
        return canvas.refuse(app, task, name, args, kwargs, options,
                             DuplicateJob(queue_key, holder, name))
    if on_duplicate == "existing":
        logger.debug("%s: queue key %r is held by %s; returning it", name, queue_key, holder)
        result_cls = options.get("result_cls") or getattr(task, "AsyncResult", app.AsyncResult)
        return result_cls(holder)
    raise DuplicateJob(queue_key, holder, name)


def _send_holding(app: Celery, send: Callable, name: str, args: Any, kwargs: Any,
                  options: dict[str, Any], queue_key: str, hold: Hold) -> Any:
    """Send a job that took ``queue_key``, then confirm the key (or release it when the
    send failed, or the broker dropped the message)."""
    store = runtime(app).store
    try:
        with delivery() as delivered:
            result = send(name, args, kwargs, **options)
    except BaseException:
        release(store, name, options["task_id"], queue_key, "publish failed")
        raise
    confirm(store, name, options, queue_key, hold, delivered)
    return result


def _send_fused(app: Celery, send: Callable, task: Any, name: str, args: Any, kwargs: Any,
                options: dict[str, Any], queue_key: str, hold: Hold,
                on_duplicate: str) -> Any:
    """Send a job whose queue key is taken inside kombu, with its message (fuse.py)."""
    rt = runtime(app)
    task_id = options["task_id"]
    request = FusedPublish(rt.fuse, task_id, queue_key,
                           rt.store.queue_key_deadline_ms(hold.expires), int(hold.window * 1000))
    try:
        with fusing(request, Delivery()) as delivered:
            result = send(name, args, kwargs, **options)
    except Refused as refused:
        _unsubscribe(app, task_id)
        return _duplicate(app, task, name, args, kwargs, options, queue_key, refused.holder,
                          on_duplicate)
    except BaseException:
        if request.took:
            release(rt.store, name, task_id, queue_key, "publish failed")
        raise
    if request.sent:
        return result
    if not request.took:
        # Not through kombu's Redis channel after all (a producer of another broker).
        logger.warning("%s[%s]: sent without passing kombu's Redis channel; its queue key %r "
                       "is taken after the send", name, task_id, queue_key)
        if rt.store.take_queue_key(queue_key, task_id) is not None:
            logger.error("%s[%s]: queue key %r was taken meanwhile: a duplicate was sent",
                         name, task_id, queue_key)
            return result
    if request.batch is not None:
        after_flush(request.batch, lambda flushed: confirm(
            rt.store, name, options, queue_key, hold, delivered) if flushed
            else release(rt.store, name, task_id, queue_key, "the publish batch was not sent"))
        return result
    confirm(rt.store, name, options, queue_key, hold, delivered)
    return result


def _unsubscribe(app: Celery, task_id: str) -> None:
    """Celery subscribed to a refused job's result before kombu was reached: cancel it."""
    consumer = getattr(app.backend, "result_consumer", None)
    try:
        if consumer is not None:
            consumer.cancel_for(task_id)
    except Exception as exc:  # a backend without subscriptions raises NotImplementedError
        logger.debug("roger: no result subscription to cancel for %s: %r", task_id, exc)


@before_task_publish.connect(weak=False, dispatch_uid="celery_roger.before_task_publish")
def _no_broker_expiration(headers: Any = None, properties: Any = None, **_: Any) -> None:
    """A roger job keeps Celery's ``expires`` but not the AMQP ``expiration`` Celery derives
    from it: RabbitMQ would drop the expired message unseen, while the worker that receives
    it revokes it (keys released, ``on_cancel`` once), as on Redis."""
    if isinstance(properties, dict) and isinstance((headers or {}).get(HEADER), dict):
        properties.pop("expiration", None)


def _queue_name(app: Celery, name: str, args: Any, kwargs: Any, options: dict[str, Any]) -> str:
    """The queue Celery's router sends this job to."""
    router = options.get("router") or app.amqp.router
    route = router.route(dict(options), options.get("route_name") or name, args, kwargs)
    queue = route.get("queue")
    return getattr(queue, "name", None) or str(queue or app.conf.task_default_queue)


# -- parking and promotion: a delivered message kept in Redis and published again ----------


def capture(message: Any) -> dict[str, Any]:
    """A delivered broker message as JSON-ready data, enough to publish it again as it was."""
    props = message.properties or {}
    info = message.delivery_info or {}
    return {
        "kind": "message",  # records.StoredJob
        "body": base64.b64encode(message.body if isinstance(message.body, bytes)
                                 else str(message.body).encode()).decode("ascii"),
        "content_type": message.content_type,
        "content_encoding": message.content_encoding,
        "headers": message.headers or {},
        "properties": {k: props[k] for k in ("correlation_id", "reply_to", "priority",
                                             "delivery_mode") if props.get(k) is not None},
        "exchange": info.get("exchange") or "",
        "routing_key": info.get("routing_key") or "",
    }


def republish(app: Celery, message: dict[str, Any]) -> None:
    """Publish a captured message again, unchanged (same job id, headers and options)."""
    with app.producer_or_acquire() as producer:
        producer.publish(
            base64.b64decode(message["body"]),
            exchange=message["exchange"],
            routing_key=message["routing_key"],
            headers=message["headers"],
            content_type=message["content_type"],
            content_encoding=message["content_encoding"],
            retry=True,
            retry_policy=app.conf.task_publish_retry_policy,
            **message["properties"],
        )
