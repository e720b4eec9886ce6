"""Admission: the check a delivered roger job passes in the worker's main process
before the pool gets it (``Consumer.on_task_request``). One Lua call either records the
job as running (taking its execution key) or parks it in Redis and acks its message. Jobs
are admitted in delivery order, so a key's parked line is FIFO."""

from __future__ import annotations

import collections
import functools
import logging
import os
import threading
import time
from typing import Any

from celery import Celery
from celery.worker import state as worker_state
from redis.exceptions import NoScriptError, RedisError

from . import events
from .failure import refuse_wrong_partition
from .job import (
    Job,
    finite,
    header_limit,
    header_problem,
    header_rate,
    is_roger_task,
    job_header,
    job_keys,
    small_arguments,
)
from .lifecycle import KEY_HANDED, RATE_OPENED, finish_job, finish_quietly, hand_off
from .pipe import LoopClosed, ScriptPipe
from .publish import capture
from .queues import QueueControl
from .runtime import healer_of, runtime
from .store_base import SCRIPTS

logger = logging.getLogger("celery_roger")


class Admission:
    """Wraps ``Consumer.on_task_request``: roger jobs pass admit before the pool."""

    def __init__(self, consumer: Any, app: Celery, instance: str) -> None:
        self.consumer = consumer
        self.app = app
        self.store = runtime(app).store
        self.fuse = runtime(app).fuse
        self.instance = instance
        self.hostname = consumer.hostname
        self.handle = consumer.on_task_request
        self.admitted: dict[str, Any] = {}
        self._retry_delay: dict[str, float] = {}
        #: earlier attempts of redelivered jobs, whose worker died: reported by the lease
        #: thread (callbacks never run in the event loop)
        self.crashed: collections.deque[dict[str, Any]] = collections.deque()
        #: (task, job) cancelled here, to report from the lease thread
        self.cancel_reports: collections.deque[tuple[Any, Job, Any]] = collections.deque()
        #: job ids that Celery's own revoke named, to cancel in roger state too
        self.revoked_ids: collections.deque[str] = collections.deque()
        #: set to have the healing thread report what this loop queued (healer.py)
        self.wakeup = threading.Event()
        self.queues = QueueControl(consumer, app)
        #: rate key -> when (monotonic) this loop's timer looks at its line next
        self.rate_timers: dict[str, float] = {}
        #: admissions sent without waiting (pipe.py); None: each call waits for its reply
        self.pipe: ScriptPipe | None = None
        #: the loop is closing (the worker stops, or its broker connection was lost): a
        #: job whose admission comes back now is not given to the pool; its key goes on
        self.detached = False

    def __call__(self, request: Any) -> Any:
        if not is_roger_task(request.task):
            return self.handle(request)
        return self.admit(request)

    def admit(self, request: Any) -> Any:
        problem = header_problem(request.request_dict)
        if problem is not None:
            logger.warning("Job %s[%s]: its roger header is malformed (%s); it runs as if "
                           "those parts were absent", request.name, request.id, problem)
        # A job published in another roger partition fails here, its keys released there.
        if refuse_wrong_partition(self.app, request, self.store.partition):
            return self._drop(request)
        ek, qk = job_keys(request.request_dict)
        request._request_dict["roger_instance"] = self.instance
        header = job_header(request.request_dict)
        rate = header_rate(header)
        replace = bool(qk) and header.get("qd") == "replace"
        if not ek and rate is None and not replace:
            # Nothing to wait for: it is admitted by its start check, in the job's own
            # process, so this event loop makes no Redis call for it.
            return self.handle(request)
        queue = header.get("q")
        info = {
            "job": request.id, "task": request.name, "instance": self.instance,
            "worker": self.hostname, "pid": os.getpid(), "ek": ek, "qk": qk,
            "queue": queue if isinstance(queue, str) and queue
            else request.delivery_info.get("routing_key") or "",
            "admitted_at": time.time(), **small_arguments(request.args, request.kwargs),
        }
        call: dict[str, Any] = dict(
            instance=self.instance, execution_key=ek, info=info,
            message={**capture(request.message), **self.fuse.place(request.message)},
            qk_release=header.get("qu") == "start", limit=header_limit(header),
            rate=rate, replace=replace, published_at=finite(header.get("at")) or 0.0,
        )
        if self.pipe is not None:
            # Sent without waiting: the loop goes on and reads the reply when it comes.
            keys, args = self.store.admit_args(request.id, **call)
            self.pipe.send(SCRIPTS["admit"].sha, keys, args,
                           functools.partial(self._replied, request, ek, qk, info["queue"]),
                           functools.partial(self._not_sent, request, call, ek, qk,
                                             info["queue"]))
            return None
        return self._admit_now(request, call, ek, qk, info["queue"])

    def _admit_now(self, request: Any, call: dict[str, Any], ek: str, qk: str,
                   queue: str) -> Any:
        """Admit, waiting for the reply."""
        try:
            admission = self.store.admit(request.id, **call)
        except RedisError as exc:
            return self._admit_later(request, exc)
        return self._decided(request, admission, ek, qk, queue)

    def _replied(self, request: Any, ek: str, qk: str, queue: str, reply: Any) -> None:
        try:
            self._decided(request, self.store.admission(request.id, reply), ek, qk, queue)
        except Exception as exc:  # neither run nor dropped: admitted again later
            logger.exception("Acting on the admission of job %s[%s] failed", request.name,
                             request.id)
            self._admit_later(request, exc)

    def _not_sent(self, request: Any, call: dict[str, Any], ek: str, qk: str, queue: str,
                  exc: Exception) -> None:
        """An admission through the pipe failed."""
        if isinstance(exc, LoopClosed):
            # The broker connection was lost with it: Celery forgot the request, and the
            # broker gives its message back (admit.lua admits it again if it ran).
            logger.info("Job %s[%s]: its admission was in flight when the broker "
                        "connection was lost; the broker delivers it again",
                        request.name, request.id)
            return
        if isinstance(exc, NoScriptError):  # Redis lost its scripts: this call loads it
            self._admit_now(request, call, ek, qk, queue)
            return
        self._admit_later(request, exc)

    def _decided(self, request: Any, admission: Any, ek: str, qk: str, queue: str) -> Any:
        if admission.outcome == "nolease":
            return self._admit_later(request, RuntimeError("this worker's lease has run out"))
        return self._admitted(request, admission, ek, qk, queue)

    def _admitted(self, request: Any, admission: Any, ek: str, qk: str, queue: str) -> Any:
        """Act on what admit.lua decided: run, drop a cancelled job, hold a job of a paused
        queue, or leave the parked job in Redis."""
        self._retry_delay.pop(request.id, None)
        if admission.crashed is not None:
            self.crashed.append(admission.crashed)
        if admission.outcome == "run":
            request.roger_watch.pool = self.consumer.pool
            request.roger_watch.admitted = request._request_dict["roger_admitted"] = \
                time.monotonic()
            # (wall clock: when it took its start of a rate, for the job to read)
            request._request_dict["roger_admitted_at"] = time.time()
            if self.detached:
                # Its message goes back to the broker (unacked): its queue key stays, its
                # execution key is handed on now.
                logger.info("Job %s[%s] was admitted as this worker's loop closed: it "
                            "does not run here", request.name, request.id)
                finish_quietly(self.app, request.id, ek, "", instance=self.instance)
                return None
            self.admitted[request.id] = request
            return self.handle(request)
        if admission.outcome == "cancelled":
            logger.info("Dropped cancelled job %s[%s]", request.name, request.id)
            finish_job(self.app, request.id, execution_key=ek, queue_key=qk)
            if admission.position:
                self.report_cancel(request.task, Job.from_request(request, started_at=0.0),
                                   request._roger_context())
            return self._drop(request)
        if admission.outcome == "paused":
            try:
                self.store.hold(request.id, queue,
                               {"kind": "message", "raw": capture(request.message)})
                if ek:  # a promoted job hands its execution key on; it keeps its queue key
                    finish_job(self.app, request.id, execution_key=ek, queue_key="")
            except RedisError as exc:
                return self._admit_later(request, exc)
            logger.info("Held job %s[%s]: queue %r is paused", request.name, request.id,
                        queue)
            events.step(self.app, "held", request.id, queue=queue)
            return self._drop(request)
        if admission.outcome == "ratewait":
            return self._wait_rate(request, admission)
        if admission.outcome == "qkwait":
            logger.info("Job %s[%s] waits for queue key %r: running job %s holds it "
                        "(on_duplicate='replace': the newest waits, older ones are "
                        "cancelled)", request.name, request.id, qk, admission.holder)
            events.step(self.app, "parked", request.id, queue_key=qk, holder=admission.holder,
                        position=1)
            return self._drop(request)
        logger.info(
            "Parked job %s[%s]: execution key %r is held by %s (position %d)",
            request.name, request.id, ek, admission.holder, admission.position,
        )
        events.step(self.app, "parked", request.id, execution_key=ek, holder=admission.holder,
                    position=admission.position)
        return self._drop(request)

    def _wait_rate(self, request: Any, admission: Any) -> None:
        """The job waits on its rate key's line: look at the line when the window opens."""
        rate_key = job_header(request.request_dict)["rk"]
        logger.info("Job %s[%s] waits for rate key %r: its window is full (position %d; "
                    "it may open in %.2fs)", request.name, request.id, rate_key,
                    admission.position, admission.opens_in)
        events.step(self.app, "parked", request.id, rate_key=rate_key,
                    position=admission.position)
        if admission.promotion is not None:  # the execution slot it gave up goes on
            self._send(admission.promotion)
        self.wake_rate(rate_key, admission.opens_in)
        return self._drop(request)

    def wake_rate(self, rate_key: str, delay: float) -> None:
        """Have this loop's timer move ``rate_key``'s line in ``delay`` seconds (unless it
        will sooner). A tick does it if this worker is gone (healer.py)."""
        at = time.monotonic() + delay
        scheduled = self.rate_timers.get(rate_key)
        if scheduled is not None and scheduled <= at:
            return
        self.rate_timers[rate_key] = at
        self.consumer.timer.call_after(delay, self._rate_due, (rate_key, at))

    def _rate_due(self, rate_key: str, at: float) -> None:
        if self.rate_timers.get(rate_key) != at:
            return  # a sooner timer took its place
        del self.rate_timers[rate_key]
        try:
            woke = self.store.rate_wake(rate_key)
        except RedisError as exc:
            logger.warning("roger: cannot move the line of rate key %r (%s); a tick will",
                           rate_key, exc)
            return
        for promotion in woke.promotions:
            self._send(promotion, RATE_OPENED)
        if woke.next_in is not None:
            self.wake_rate(rate_key, woke.next_in)

    def _send(self, promotion: Any, why: str = KEY_HANDED) -> None:
        """Send a promoted job from the publishing thread (here if there is none)."""
        healer = healer_of(self.app)
        if healer is not None:
            healer.hand_off(promotion, why)
        else:
            hand_off(self.app, promotion, why)

    def _drop(self, request: Any) -> None:
        """The job is kept in Redis (or cancelled): ack its message, free its slot."""
        worker_state.task_ready(request)
        request.acknowledge()

    def report_cancel(self, task: Any, job: Job, request: Any = None) -> None:
        """Have the lease thread mark the job REVOKED and run on_cancel (not this loop)."""
        self.cancel_reports.append((task, job, request))
        self.wakeup.set()

    def _admit_later(self, request: Any, exc: Exception) -> None:
        """Redis is unreachable: keep the job (unacked) and try admitting it again."""
        delay = min(self._retry_delay.get(request.id, 0.5) * 2, 10.0)
        self._retry_delay[request.id] = delay
        logger.error(
            "Cannot admit job %s[%s] (%s); trying again in %.0fs",
            request.name, request.id, exc, delay,
        )
        self.consumer.timer.call_after(delay, self.admit, (request,))

    def detach(self) -> None:
        """The loop closes: admissions that come back from now on do not run here."""
        self.detached = True

    def close(self) -> None:
        """The worker stops: read the admissions still in flight (a job admitted then
        does not run; its execution key is handed on)."""
        self.detach()
        if self.pipe is not None:
            self.pipe.drain()
            self.pipe.close()

    def forget_done(self) -> None:
        reserved = worker_state.reserved_requests
        for job_id, request in list(self.admitted.items()):
            if request not in reserved:
                del self.admitted[job_id]
