"""``Roger(app)``: the user's handle on roger state."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from celery import Celery

from . import events, inspect
from .failure import send_entry
from .job import FRESH_ADMISSION_SECONDS, BuriedJob
from .runtime import install, runtime
from .worker import finish_job, hand_off, job_header, job_keys, publish_due

logger = logging.getLogger("celery_roger")

KEY_KINDS = ("queue", "execution")
PAUSE_SETTLE_SECONDS = 0.1  # > FRESH_ADMISSION_SECONDS


class Roger:
    """Inspect and steer the roger state of a Celery app's partition."""

    def __init__(self, app: Celery) -> None:
        self.app = install(app)
        self.store = runtime(app).store

    @property
    def partition(self) -> str:
        return self.store.partition

    def release_key(self, kind: str, key: str) -> str | None:
        """Force-release a queue key or execution key; returns the job that held it.

        Releasing an execution key hands it to the next parked job. The job that held
        it is not stopped.
        """
        if kind not in KEY_KINDS:
            raise ValueError(f"kind must be one of {KEY_KINDS}, got {kind!r}")
        if not isinstance(key, str) or not key:
            raise ValueError(f"key must be a non-empty str, got {key!r}")
        if kind == "queue":
            return self.store.release_queue_key(key)
        holder = self.store.execution_key_holder(key)
        promotion = self.store.finish(holder or "", execution_key=key, force=True).promotion
        if promotion is not None:
            hand_off(self.app, promotion)
        return holder

    def purge_queue(self, queue: str) -> int:
        """Remove every waiting job of ``queue``, in the broker and parked; returns how many.

        The queue keys (and handed-over execution keys) of the removed jobs are released.
        Running jobs are not touched.
        """
        _check_queue(queue)
        removed = 0
        for job_id, message in list(self.store.parked_messages()):
            headers = message.get("headers") or {}
            if job_header(headers).get("q") != queue:
                continue
            ek, qk = job_keys(headers)
            if self.store.drop_parked(job_id, execution_key=ek, queue_key=qk, queue=queue):
                removed += 1
        with self.app.connection_for_write() as conn:
            # A channel of its own: on RabbitMQ, asking for a queue that does not exist
            # closes the channel that asked.
            channel = conn.channel()
            try:
                try:
                    channel.queue_declare(queue=queue, passive=True)
                except conn.channel_errors:
                    return removed  # the broker has no such queue: nothing waits there
                while (message := channel.basic_get(queue, no_ack=True)) is not None:
                    removed += 1
                    headers = message.headers or {}
                    ek, qk = job_keys(headers)
                    if headers.get("id") and (ek or qk):
                        finish_job(self.app, str(headers["id"]), execution_key=ek,
                                   queue_key=qk)
            finally:
                with contextlib.suppress(Exception):
                    channel.close()
        return removed

    # -- cancellation ----------------------------------------------------------------------

    def cancel(self, job_id: str) -> str:
        """Cancel a job, wherever it is: it never runs (again) and is never retried.

        Returns where roger found it: ``"running"`` (it is stopped), ``"retry"``,
        ``"parked"`` or ``"paused"`` (taken out of Redis), or ``""`` (queued in the
        broker, finished, or unknown: a worker drops it if it is ever delivered).
        Cancelling an unknown or finished job is harmless.
        """
        if not isinstance(job_id, str) or not job_id:
            raise ValueError(f"job_id must be a non-empty str, got {job_id!r}")
        running, where = self.store.cancel(job_id)
        # Every worker drops copies delivered to it; the one running it kills it.
        self.app.control.broadcast("roger_cancel", arguments={"job_ids": [job_id]},
                                   reply=False)
        if running:
            # Admitted somewhere: wait out the window in which it may start without its
            # start check (it is killed as it starts), so none starts after this returns.
            time.sleep(FRESH_ADMISSION_SECONDS)
        return "running" if running else where

    # -- pause and resume ----------------------------------------------------------------

    def pause(self, queue: str, reason: str | None = None) -> None:
        """Pause ``queue`` for the whole cluster: once this returns, none of its jobs
        starts anywhere until ``resume``. Running jobs finish; publishing still works."""
        _check_queue(queue)
        if reason is not None and not isinstance(reason, str):
            raise ValueError(f"reason must be a str, got {reason!r}")
        self.store.pause(queue, reason)
        self.app.control.broadcast("roger_pause", arguments={"queue": queue}, reply=False)
        # A job that passed its start check just before the pause is starting, not
        # waiting: give such jobs a moment to begin, so none begins after this returns.
        time.sleep(PAUSE_SETTLE_SECONDS)

    def resume(self, queue: str) -> int:
        """Resume ``queue``; returns how many held jobs were published again."""
        _check_queue(queue)
        released = self.store.resume(queue)
        self.app.control.broadcast("roger_resume", arguments={"queue": queue}, reply=False)
        while due := self.store.take_due():
            publish_due(self.app, due)
        return released

    def paused_queues(self) -> set[str]:
        return set(self.store.paused())

    # -- inspection ------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """A JSON-ready snapshot of roger state (see README, "Inspection")."""
        return inspect.info(self.app, self.store)

    def job(self, job_id: str) -> dict[str, Any]:
        """Roger's view of one job, with an explanation when it is not running."""
        if not isinstance(job_id, str) or not job_id:
            raise ValueError(f"job_id must be a non-empty str, got {job_id!r}")
        return inspect.job(self.app, self.store, job_id)

    def keys(self, kind: str, prefix: str | None = None, limit: int = 100,
             cursor: int = 0) -> dict[str, Any]:
        """A page of held keys of ``kind`` ("queue" or "execution"); pass the returned
        ``cursor`` to get the next page (0 when done)."""
        if kind not in KEY_KINDS:
            raise ValueError(f"kind must be one of {KEY_KINDS}, got {kind!r}")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be an int >= 1, got {limit!r}")
        return inspect.keys(self.store, kind, prefix, limit, cursor)

    # -- the buried queue -----------------------------------------------------------------

    def buried(self, queue: str | None = None, limit: int = 100,
               offset: int = 0) -> list[BuriedJob]:
        """Buried jobs, newest first: of one queue, or of every queue."""
        if queue is not None:
            _check_queue(queue)
        for name, value in (("limit", limit), ("offset", offset)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if limit == 0:
            return []
        return [BuriedJob.from_entry(e) for e in self.store.buried(queue, offset, limit)]

    def buried_dropped(self) -> dict[str, int]:
        """Per queue, how many buried jobs were dropped to respect ``roger_buried_max``."""
        return self.store.buried_dropped()

    def requeue_buried(self, job_id: str | None = None, *, queue: str | None = None,
                       all: bool = False) -> int:
        """Publish buried jobs again (same id, retry count 0); returns how many.

        ``requeue_buried(job_id)`` or ``requeue_buried(queue=..., all=True)``. A job whose
        queue key is held by another job stays buried and is not counted.
        """
        if job_id is not None:
            if queue is not None or all:
                raise ValueError("give either a job id, or queue=... with all=True")
            if not isinstance(job_id, str) or not job_id:
                raise ValueError(f"job_id must be a non-empty str, got {job_id!r}")
            return int(self._requeue(job_id))
        if queue is None or not all:
            raise ValueError("give a job id, or queue=... with all=True")
        _check_queue(queue)
        return sum(self._requeue(job) for job in reversed(self.store.buried_ids(queue)))

    def _requeue(self, job_id: str) -> bool:
        outcome, value = self.store.requeue_take(job_id)
        if outcome == "missing":
            return False
        if outcome == "held":
            logger.warning("Buried job %s stays buried: its queue key is held by job %s",
                           job_id, value)
            return False
        queue_key = value.get("queue_key") or ""
        try:
            # Its FAILURE result is forgotten: the job is pending again.
            self.app.AsyncResult(job_id).forget()
        except Exception:
            logger.debug("could not forget the result of %s", job_id, exc_info=True)
        try:
            # Requeued to run: a stale expiry would revoke it (or let a broker drop it).
            publish = {**value["publish"], "options": {
                k: v for k, v in (value["publish"].get("options") or {}).items()
                if k != "expires"}}
            send_entry(self.app, publish, retry_count=0)
        except BaseException:
            if queue_key:
                self.store.release_queue_key(queue_key, job_id)
            raise
        self.store.unbury(job_id, value.get("queue", ""), queue_key)
        logger.info("Requeued buried job %s[%s]", value.get("task"), job_id)
        events.send(self.app, "requeued", job_id)
        return True

    def purge_buried(self, queue: str | None = None) -> int:
        """Delete the buried jobs of ``queue`` (of every queue when None); returns how many."""
        if queue is not None:
            _check_queue(queue)
        queues = [queue] if queue is not None else self.store.buried_queues()
        return sum(self.store.purge_buried(q) for q in queues)

    def __repr__(self) -> str:
        return f"<Roger partition={self.partition!r}>"




def _check_queue(queue: object) -> None:
    if not isinstance(queue, str) or not queue:
        raise ValueError(f"queue must be a non-empty str, got {queue!r}")
