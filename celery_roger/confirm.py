"""Publishing, step 2: a job sent holding its queue key has the key confirmed (it is in
the broker), or released when the send failed or the broker dropped the message; and
``on_duplicate="replace"``, whose newest publish wins the key (replace_take.lua)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, NamedTuple

from celery import Celery
from redis.exceptions import RedisError

from . import events
from .errors import DuplicateJob
from .job import HEADER
from .kombu_guard import Delivery, delivery
from .runtime import runtime

logger = logging.getLogger("celery_roger")


class Hold(NamedTuple):
    """How long a published job's queue key is held, besides its attempt: ``expires``
    (seconds until the job's expiry, or None) and ``window`` (queue_key_until seconds: a
    throttle window from the accepted publish; 0 for none)."""

    expires: float | None
    window: float


def confirm(store: Any, name: str, options: dict[str, Any], queue_key: str,
             hold: Hold, delivered: Delivery) -> None:
    """The job was sent holding ``queue_key`` (pending): confirm the key, or release it
    when the broker dropped the message."""
    task_id = options["task_id"]
    if delivered.unroutable:
        # A Redis broker drops a message that its exchange routes to no queue, silently.
        logger.error("%s[%s]: the broker routed it to no queue (exchange %r, routing key "
                     "%r) and dropped it; its queue key %r is released", name, task_id,
                     options.get("exchange"), options.get("routing_key"), queue_key)
        release(store, name, task_id, queue_key, "dropped by the broker")
        return
    try:
        confirmed = store.confirm_queue_key(queue_key, task_id, hold.expires, hold.window)
    except RedisError as exc:
        # The job is in the broker: report the publish as done. Its queue key stays
        # taken, and frees itself after the grace period if the job has not started.
        logger.warning(
            "%s[%s]: published, but its queue key %r could not be confirmed (Redis: %s); "
            "it stays held at most %ss before the job starts", name, task_id, queue_key, exc,
            store.settings.publish_grace_seconds,
        )
        return
    if not confirmed:
        logger.warning(
            "%s[%s]: published, but queue key %r was no longer held by it (the publish took "
            "longer than roger_publish_grace_seconds)", name, task_id, queue_key,
        )


def release(store: Any, name: str, task_id: str, queue_key: str, why: str) -> None:
    try:
        store.release_queue_key(queue_key, task_id)
    except Exception as exc:
        logger.warning("%s[%s]: %s, and queue key %r could not be released (%s); it frees "
                       "itself after %ss", name, task_id, why, queue_key, exc,
                       store.settings.publish_grace_seconds)


def send_replacing(app: Celery, send: Callable, name: str, args: Any, kwargs: Any,
                    options: dict[str, Any], queue_key: str, hold: Hold) -> Any:
    """on_duplicate="replace": the newest publish wins the queue key (replace_take.lua).
    A holder that has not started is cancelled once this job is in the broker; behind a
    running holder, this job is sent and waits for the key on its worker (admit.lua)."""
    if hold.window:
        raise ValueError(f"{name}: on_duplicate='replace' cannot be combined with a "
                         f"throttle window (queue_key_until={hold.window})")
    options["headers"][HEADER]["qd"] = "replace"  # (admitted by its worker: admit.lua)
    store = runtime(app).store
    task_id = options["task_id"]
    outcome, holder = store.replace_take(queue_key, task_id)
    if outcome == "refused":  # inside a throttle window
        raise DuplicateJob(queue_key, holder, name)
    try:
        with delivery() as delivered:
            result = send(name, args, kwargs, **options)
    except BaseException:
        if outcome == "took":
            release(store, name, task_id, queue_key, "publish failed")
        elif outcome == "replacing":
            store.replace_done(queue_key, task_id, sent=False, previous=holder)
        raise
    if outcome == "behind":
        logger.info("%s[%s]: queue key %r is held by running job %s; this job waits for "
                    "it", name, task_id, queue_key, holder)
        return result
    if outcome == "replacing":
        sent = not delivered.unroutable
        if store.replace_done(queue_key, task_id, sent=sent, previous=holder) and sent:
            cancel_replaced(app, name, holder, task_id, queue_key)
    confirm(store, name, options, queue_key, hold, delivered)
    return result


def cancel_replaced(app: Celery, name: str, job_id: str, by: str, queue_key: str) -> None:
    """Cancel a holder replaced by a newer publish: REVOKED now; it never runs (a worker
    holding it for its countdown drops it, and its on_cancel runs then, once)."""
    logger.info("%s[%s]: replaced by %s (queue key %r); cancelled", name, job_id, by,
                queue_key)
    try:
        runtime(app).store.cancel(job_id)
    except RedisError:
        logger.exception("%s[%s]: could not cancel it after it was replaced", name, job_id)
        return
    app.control.broadcast("roger_cancel", arguments={"job_ids": [job_id]}, reply=False)
    try:
        app.backend.mark_as_revoked(job_id, "replaced")
    except Exception:
        logger.exception("could not store REVOKED for replaced job %s", job_id)
    events.step(app, "replaced", job_id, by=by, queue_key=queue_key)
