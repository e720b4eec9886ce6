"""The publish side: queue-key dedup around Celery's ``send_task``, and republishing."""

from __future__ import annotations

import base64
import datetime
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

from celery import Celery
from celery.signals import before_task_publish
from celery.utils import uuid
from celery.utils.iso8601 import parse_iso8601 as isoparse
from redis.exceptions import RedisError

from . import canvas, events
from .errors import DuplicateJob
from .job import HEADER
from .runtime import runtime

logger = logging.getLogger("celery_roger")

UNSET: Any = type("Unset", (), {"__repr__": lambda self: "UNSET"})()
ON_DUPLICATE = ("raise", "existing")


def roger_send_task(app: Celery, send: Callable) -> Callable:
    """``app.send_task`` that also takes ``queue_key``, ``execution_key``, ``on_duplicate``."""

    @functools.wraps(send)
    def send_task(name: str, args: Any = None, kwargs: Any = None, *, queue_key: Any = UNSET,
                  execution_key: Any = UNSET, on_duplicate: str | None = None,
                  **options: Any) -> Any:
        return publish(app, send, name, args, kwargs, options, queue_key=queue_key,
                       execution_key=execution_key, on_duplicate=on_duplicate)

    return send_task


def publish(app: Celery, send: Callable, name: str, args: Any, kwargs: Any,
            options: dict[str, Any], *, queue_key: Any, execution_key: Any,
            on_duplicate: str | None) -> Any:
    from .task import RogerTask

    headers = options.get("headers") or {}
    if isinstance(headers.get(HEADER), dict) or options.get("retries"):
        # A roger job published again (Celery's retry): it keeps the keys it was first
        # published with, and a retry never takes its queue key again.
        return send(name, args, kwargs, **options)
    if headers.get(HEADER) is not None:
        logger.warning("%s: headers[%r] is not roger's header (%s); it is replaced", name,
                       HEADER, type(headers[HEADER]).__name__)

    task = app.tasks.get(name)
    if isinstance(task, RogerTask):
        queue_key, execution_key = task.roger_keys(
            tuple(args or ()), dict(kwargs or {}), queue_key=queue_key, execution_key=execution_key
        )
        on_duplicate = on_duplicate or task.on_duplicate
    else:
        from .keys import validate

        queue_key = validate(name, "queue_key", None if queue_key is UNSET else queue_key)
        execution_key = validate(
            name, "execution_key", None if execution_key is UNSET else execution_key
        )
        if queue_key is None and execution_key is None:
            return send(name, args, kwargs, **options)
    on_duplicate = on_duplicate or "raise"
    if on_duplicate not in ON_DUPLICATE:
        raise ValueError(
            f"{name}: on_duplicate must be one of {ON_DUPLICATE}, got {on_duplicate!r}"
        )

    task_id = options["task_id"] = options.get("task_id") or uuid()
    job = {"q": _queue_name(app, name, args, kwargs, options), "at": time.time()}
    if queue_key is not None:
        job["qk"] = queue_key
    if execution_key is not None:
        job["ek"] = execution_key
    options["headers"] = {**headers, HEADER: job}
    if queue_key is None:
        return send(name, args, kwargs, **options)

    store = runtime(app).store
    holder = store.take_queue_key(queue_key, task_id)
    if holder is not None:
        if canvas.in_canvas(options):
            # Dependents wait on this job's own id: it is refused as a failure (canvas.py).
            events.send(app, "deduplicated", holder, queue_key=queue_key, refused_task=name)
            return canvas.refuse(app, task, name, args, kwargs, options,
                                 DuplicateJob(queue_key, holder, name))
        if on_duplicate == "existing":
            logger.debug("%s: queue key %r is held by %s; returning it", name, queue_key, holder)
            events.send(app, "deduplicated", holder, queue_key=queue_key, refused_task=name)
            result_cls = options.get("result_cls") or getattr(task, "AsyncResult", app.AsyncResult)
            return result_cls(holder)
        events.send(app, "deduplicated", holder, queue_key=queue_key, refused_task=name)
        raise DuplicateJob(queue_key, holder, name)
    try:
        result = send(name, args, kwargs, **options)
    except BaseException:
        try:
            store.release_queue_key(queue_key, task_id)
        except Exception:
            logger.exception(
                "%s[%s]: publish failed and queue key %r could not be released; it frees "
                "itself after %ss", name, task_id, queue_key, store.settings.publish_grace_seconds,
            )
        raise
    try:
        confirmed = store.confirm_queue_key(queue_key, task_id,
                                            expires_in(app, options.get("expires")))
    except RedisError as exc:
        # The job is in the broker: report the publish as done. Its queue key stays
        # taken, and frees itself after the grace period if the job has not started.
        logger.warning(
            "%s[%s]: published, but its queue key %r could not be confirmed (Redis: %s); "
            "it stays held at most %ss before the job starts", name, task_id, queue_key, exc,
            store.settings.publish_grace_seconds,
        )
        return result
    if not confirmed:
        logger.warning(
            "%s[%s]: published, but queue key %r was no longer held by it (the publish took "
            "longer than roger_publish_grace_seconds)", name, task_id, queue_key,
        )
    return result


@before_task_publish.connect(weak=False, dispatch_uid="celery_roger.before_task_publish")
def _no_broker_expiration(headers: Any = None, properties: Any = None, **_: Any) -> None:
    """A roger job keeps Celery's ``expires`` but not the AMQP ``expiration`` Celery derives
    from it: RabbitMQ would drop the expired message unseen, while the worker that receives
    it revokes it (keys released, ``on_cancel`` once), as on Redis."""
    if isinstance(properties, dict) and isinstance((headers or {}).get(HEADER), dict):
        properties.pop("expiration", None)


def expires_in(app: Celery, expires: Any) -> float | None:
    """Seconds until a job's ``expires`` (as Celery reads it), or None."""
    if expires is None:
        return None
    if isinstance(expires, datetime.datetime):
        return (expires - app.now()).total_seconds()
    if isinstance(expires, str):
        return (isoparse(expires) - app.now()).total_seconds()
    return float(expires)


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
