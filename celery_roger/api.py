"""``Roger(app)``: the user's handle on roger state."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from celery import Celery

from . import events, inspect, lists, store_reads
from .failure import send_entry
from .install import install
from .job import FRESH_ADMISSION_SECONDS, HEADER, BuriedJob, job_keys
from .keys import execution_limit, rate, validate
from .lifecycle import KEY_HANDED, RATE_OPENED, finish_job, hand_off, publish_due
from .runtime import runtime
from .store import preview

logger = logging.getLogger("celery_roger")

KEY_KINDS = ("queue", "execution")
LIMIT_KINDS = ("execution", "rate")
PAUSE_SETTLE_SECONDS = 0.1  # > FRESH_ADMISSION_SECONDS
#: The worker instance a purge finishes drained jobs under: none runs under it.
PURGE_INSTANCE = "roger-purge"


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
        holder = store_reads.execution_key_holder(self.store, key)
        promotion = self.store.finish(holder or "", execution_key=key, force=True).promotion
        if promotion is not None:
            hand_off(self.app, promotion)
        return holder

    def set_limit(self, kind: str, key: str, value: int | str | None) -> list[str]:
        """Change the limit of ``key`` live, for the whole cluster (an incident knob):
        ``kind`` "execution" (``value`` an int >= 1, its execution_limit) or "rate"
        (``value`` a rate, "N/s", "N/m" or "N/h"); ``value`` None returns the key to its
        jobs' own limit. A raised limit starts waiting jobs at once (returns their ids); a
        lowered one takes effect as running jobs end (execution) or from the next start
        (rate)."""
        if kind not in LIMIT_KINDS:
            raise ValueError(f"kind must be one of {LIMIT_KINDS}, got {kind!r}")
        if not isinstance(key, str) or not key:
            raise ValueError(f"key must be a non-empty str, got {key!r}")
        label = f"set_limit({key!r})"
        if kind == "rate":
            validate("set_limit", "rate_key", key)
            promotions = self.store.set_rate(key, None if value is None else rate(label, value))
            why = RATE_OPENED
        else:
            validate("set_limit", "execution_key", key)
            limit = None if value is None else execution_limit(label, value)
            promotions = self.store.set_limit(key, limit)
            why = KEY_HANDED
        for promotion in promotions:
            hand_off(self.app, promotion, why)
        return [p.job_id for p in promotions]

    def limits(self) -> dict[str, dict[str, Any]]:
        """The live limits set by ``set_limit``, by kind and key (rates as "N/s" ...)."""
        return {"execution": self.store.limits(), "rate": self.store.rates()}

    def purge(self, queue: str) -> dict[str, int]:
        """Purge ``queue`` through roger; returns how many jobs were removed from each
        place: ``{"broker", "parked", "held", "retrying"}``.

        Removed: the queue's messages in the broker (one by one, so the keys of each are
        known), and the jobs roger keeps for it: parked behind an execution key, held
        while it is paused, waiting for a retry. Their queue keys are released, and an
        execution key handed to a removed promoted job goes to the next in line. Running
        and buried jobs are not touched; removed jobs never run and stay ``PENDING``.
        """
        _check_queue(queue)
        counts = self.store.purge_queue(queue)
        broker = 0
        with self.app.connection_for_write() as conn:
            # A channel of its own: on RabbitMQ, asking for a queue that does not exist
            # closes the channel that asked.
            channel = conn.channel()
            try:
                try:
                    channel.queue_declare(queue=queue, passive=True)
                except conn.channel_errors:
                    return {"broker": 0, **counts}  # the broker has no such queue
                while (message := channel.basic_get(queue, no_ack=True)) is not None:
                    broker += 1
                    headers = message.headers or {}
                    ek, qk = job_keys(headers)
                    if headers.get("id") and (ek or qk):
                        # An instance no attempt runs under: if a copy of this job is
                        # running (a redelivery), finish.lua leaves its keys alone.
                        finish_job(self.app, str(headers["id"]), execution_key=ek,
                                   queue_key=qk, instance=PURGE_INSTANCE)
            finally:
                with contextlib.suppress(Exception):
                    channel.close()
        return {"broker": broker, **counts}

    def purge_queue(self, queue: str) -> int:
        """``purge(queue)``, as one number: how many jobs were removed."""
        return sum(self.purge(queue).values())

    # -- cancellation ----------------------------------------------------------------------

    def cancel(self, job_id: str, *, by: str | None = None) -> str:
        """Cancel a job, wherever it is: it never runs (again) and is never retried.

        Returns where roger found it: ``"running"`` (it is stopped), ``"retry"``,
        ``"parked"`` or ``"paused"`` (taken out of Redis), or ``""`` (queued in the
        broker, finished, or unknown: a worker drops it if it is ever delivered).
        Cancelling an unknown or finished job is harmless. ``by``: who cancels it, for
        the job's history.
        """
        if not isinstance(job_id, str) or not job_id:
            raise ValueError(f"job_id must be a non-empty str, got {job_id!r}")
        return self.cancel_jobs([job_id], by=by)[job_id]

    def cancel_jobs(self, job_ids: list[str], *, by: str | None = None) -> dict[str, str]:
        """``cancel`` for several jobs at once (one broadcast, one wait): each job's
        answer, as ``cancel`` gives it."""
        if not isinstance(job_ids, (list, tuple)) or not all(
                isinstance(j, str) and j for j in job_ids):
            raise ValueError(f"job ids must be non-empty str, got {job_ids!r:.80}")
        if by is not None and not isinstance(by, str):
            raise ValueError(f"by must be a str, got {by!r:.80}")
        found: dict[str, str] = {}
        try:
            for job_id in dict.fromkeys(job_ids):
                running, where = self.store.cancel(job_id, by=by or "")
                found[job_id] = "running" if running else where
        finally:
            # Every worker drops copies delivered to it; the one running it kills it (the
            # ones stored before a failure too).
            if found:
                self.app.control.broadcast("roger_cancel", arguments={"job_ids": list(found)},
                                           reply=False)
        if "running" in found.values():
            # Admitted somewhere: wait out the window in which it may start without its
            # start check (it is killed as it starts), so none starts after this returns.
            time.sleep(FRESH_ADMISSION_SECONDS)
        return found

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
        return store_reads.paused_queues(self.store)

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

    def browse(self, kind: str, *, limit: int = 50, cursor: str | None = None,
               **filters: Any) -> dict[str, Any]:
        """One page of a list of roger state: ``{"kind", "items", "cursor", "total"}``;
        pass ``cursor`` back for the next page (None: no more). ``kind``: one of
        ``lists.KINDS``; ``filters``: ``queue``, ``task``, ``error``, ``worker``, ``key``,
        ``prefix`` (str), ``since``, ``until`` (Unix seconds); which apply to which kind,
        and what each page reads, is in ``celery_roger/lists.py``."""
        if kind not in lists.KINDS:
            raise ValueError(f"kind must be one of {lists.KINDS}, got {kind!r}")
        if isinstance(limit, bool) or not isinstance(limit, int) or \
                not 1 <= limit <= lists.MAX_LIMIT:
            raise ValueError(f"limit must be an int from 1 to {lists.MAX_LIMIT}, got {limit!r}")
        if cursor is not None and not isinstance(cursor, str):
            raise ValueError(f"cursor must be a str from a previous page, got {cursor!r}")
        return lists.page(self.store, kind, limit=limit, cursor=cursor or None,
                          filters=lists.filters(filters))

    def buried_facets(self) -> dict[str, dict[str, int]]:
        """How many jobs are buried per ``task``, per ``error`` type and per ``queue``."""
        return lists.buried_facets(self.store)

    def purge_buried_jobs(self, job_ids: list[str]) -> int:
        """Delete these buried jobs; returns how many of them were buried."""
        if not isinstance(job_ids, (list, tuple)) or not all(
                isinstance(j, str) and j for j in job_ids):
            raise ValueError(f"job_ids must be a list of non-empty str, got {job_ids!r:.80}")
        return self.store.drop_buried(list(job_ids))

    def stats(self) -> dict[str, int]:
        """The partition's counters: ``dedup_refused``, ``cancelled``, ``quarantined`` ..."""
        return inspect.stats(self.store)

    def quarantined(self) -> dict[str, dict[str, Any]]:
        """What roger moved aside because it could not read it, by key (``key#field`` for
        one value of a hash): ``{"key", "field", "reason", "value", "preview", "at"}`` for a
        value, ``{"key", "type", "expected", "moved_to", "preview", "at"}`` for a whole key
        of the wrong type (renamed to ``moved_to``); ``at`` in ms of Redis's clock. Nothing
        is deleted: look at it, then delete the ``quarantine`` hash (and the moved keys)."""
        return inspect.quarantined(self.store)

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
        return inspect.buried(self.store, queue, offset, limit)

    def buried_dropped(self) -> dict[str, int]:
        """Per queue, how many buried jobs were dropped to respect ``roger_buried_max``."""
        return inspect.buried_dropped(self.store)

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
        return sum(self._requeue(job) for job in reversed(inspect.buried_ids(self.store, queue)))

    def _requeue(self, job_id: str) -> bool:
        outcome, value = self.store.requeue_take(job_id)
        if outcome == "missing":
            return False
        if outcome == "taken":
            logger.warning("Buried job %s stays buried: its queue key is held by job %s",
                           job_id, value)
            return False
        queue_key = value.get("queue_key") if isinstance(value.get("queue_key"), str) else ""
        publish = _publishable(value.get("publish"))
        if publish is None:
            if queue_key:
                self.store.release_queue_key(queue_key, job_id)
            logger.error("Buried job %s stays buried: its entry has nothing publishable "
                         "(%s)", job_id, preview(value.get("publish")))
            return False
        try:
            # Its FAILURE result is forgotten: the job is pending again.
            self.app.AsyncResult(job_id).forget()
        except Exception:
            logger.debug("could not forget the result of %s", job_id, exc_info=True)
        try:
            send_entry(self.app, publish, retry_count=0)
        except BaseException:
            if queue_key:
                self.store.release_queue_key(queue_key, job_id)
            raise
        queue = value.get("queue")
        self.store.unbury(job_id, queue if isinstance(queue, str) else "", queue_key)
        logger.info("Requeued buried job %s[%s]", publish["task"], job_id)
        events.step(self.app, "requeued", job_id, queue=queue if isinstance(queue, str) else "")
        return True

    def purge_buried(self, queue: str | None = None) -> int:
        """Delete the buried jobs of ``queue`` (of every queue when None); returns how many."""
        if queue is not None:
            _check_queue(queue)
        queues = [queue] if queue is not None else inspect.buried_queues(self.store)
        return sum(self.store.purge_buried(q) for q in queues)

    def __repr__(self) -> str:
        return f"<Roger partition={self.partition!r}>"


def _publishable(publish: Any) -> dict[str, Any] | None:
    """A buried entry's ``publish`` (Celery's send_task arguments), ready to send again
    (without a stale expiry: it would revoke the job or let a broker drop it), or None
    when it is not one."""
    if not isinstance(publish, dict) or not isinstance(publish.get("task"), str):
        return None
    args, kwargs, options = (publish.get("args", []), publish.get("kwargs", {}),
                             publish.get("options", {}))
    if not isinstance(args, list) or not isinstance(kwargs, dict) or \
            not isinstance(options, dict):
        return None
    headers = options.get("headers", {})
    if not isinstance(headers, dict) or not isinstance(headers.get(HEADER, {}), dict):
        return None
    return {"task": publish["task"], "args": args, "kwargs": kwargs,
            "options": {k: v for k, v in options.items() if k != "expires"}}


def _check_queue(queue: object) -> None:
    if not isinstance(queue, str) or not queue:
        raise ValueError(f"queue must be a non-empty str, got {queue!r}")
