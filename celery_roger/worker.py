"""The worker side: admission, leases, and the end of each attempt.

* Admission runs in the worker's main process, when a delivered roger job is handed to
  the pool (``Consumer.on_task_request``): one Lua call either records the job as
  running (taking its execution key) or parks it in Redis and acks its message. Jobs are
  admitted in delivery order, so a key's parked line is FIFO.
* A ``WorkerLease`` thread in the main process renews this worker's lease about once a
  second and heals what dead workers left behind (their running jobs are finished, which
  frees their keys and promotes the next parked jobs). If renewals fail for nearly a
  lease, it kills this worker's roger jobs, so a freed key never has a live holder.
* An attempt ends in the job's process (``task_postrun``: result stored, then keys
  released and the next parked job published), or in the main process when the job's
  process died (worker lost), hit the hard time limit, or was revoked.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from billiard.einfo import ExceptionWithTraceback
from celery import Celery, bootsteps, signals
from celery import states as states_
from celery.app.task import Context
from celery.exceptions import Retry, TimeLimitExceeded, WorkerLostError
from celery.utils.saferepr import saferepr as safe_repr
from celery.worker import state as worker_state
from celery.worker.request import Request
from celery.worker.state import task_ready
from redis.exceptions import AuthenticationError, RedisError

from . import events
from .config import redact_url
from .control import QueueControl
from .errors import ConfigurationError, JobTimeout, WorkerCrashed
from .failure import job_from_stored, publish_stored, record, request_from_stored
from .job import FRESH_ADMISSION_SECONDS, Job, header_problem, job_header, small_arguments
from .kombu_guard import guard_redis_transport
from .publish import capture, republish
from .runtime import runtime
from .store import DueRetry, Promotion, loads

logger = logging.getLogger("celery_roger")

TICK_SECONDS = 1.0
#: A running record younger than this is never taken for ended by ``reconcile`` (its
#: admission may not have reached this worker's own books yet).
RECONCILE_MIN_AGE_SECONDS = 10.0


def job_keys(request: Any) -> tuple[str, str]:
    """(execution key, queue key) a job was published with; '' for none."""
    job = job_header(request)
    return _key(job.get("ek")), _key(job.get("qk"))


def _key(value: Any) -> str:
    return value if isinstance(value, str) else ""


def hand_off(app: Celery, promotion: Promotion) -> None:
    """Publish a promoted job; if that fails, a worker's tick publishes it later."""
    store = runtime(app).store
    try:
        republish(app, promotion.message)
    except Exception:
        logger.exception(
            "could not publish promoted job %s; it will be published again within %ss",
            promotion.job_id, store.settings.publish_grace_seconds,
        )
        return
    store.confirm_promoted(promotion.job_id)
    logger.info("Promoted job %s: its execution key was handed to it", promotion.job_id)
    events.send(app, "promoted", promotion.job_id)


def finish_job(app: Celery, job_id: str, *, execution_key: str, queue_key: str) -> bool:
    """End a job's attempt in roger state and start the next parked job, if any.

    Returns whether the job was recorded as running (true for one caller per attempt).
    """
    finished = runtime(app).store.finish(job_id, execution_key=execution_key,
                                         queue_key=queue_key)
    if finished.promotion is not None:
        hand_off(app, finished.promotion)
    return finished.was_running


def _finish_quietly(app: Celery, job_id: str, execution_key: str, queue_key: str) -> bool:
    try:
        return finish_job(app, job_id, execution_key=execution_key, queue_key=queue_key)
    except Exception:
        logger.exception(
            "could not release the keys of job %s; its worker's lease frees them", job_id
        )
        return True


def _unwrap(exc: BaseException) -> BaseException:
    return exc.exc if isinstance(exc, ExceptionWithTraceback) else exc


class RogerRequest(Request):
    """Main-process ends of an attempt that the job's own process never reports.

    A child that died (worker lost) or was killed at the hard time limit: roger records
    a retry or burial here, releases the keys, and runs ``on_error``/``on_buried`` with
    ``state=None``. A retry is stored as Celery's ``RETRY`` state, not ``FAILURE``.
    """

    _roger_started = False
    _roger_started_at = 0.0
    _roger_lease_lost = False
    _roger_ended = False
    _roger_retried = False
    _roger_admitted = 0.0
    _roger_cancel_on_start = False

    def on_accepted(self, pid: int, time_accepted: float) -> None:
        super().on_accepted(pid, time_accepted)
        self._roger_started = True
        self._roger_started_at = time.time()
        if self._roger_lease_lost:
            # The worker lost its lease while this job waited for a pool slot.
            _kill(self)
        elif self._roger_cancel_on_start and \
                time_accepted - self._roger_admitted < FRESH_ADMISSION_SECONDS:
            # Cancelled while it waited for this slot, and fresh enough to start without
            # its start check: stop it now.
            try:
                self.terminate(self._roger_pool, signal=signal.SIGKILL)
            except NotImplementedError:
                logger.warning("Job %s was cancelled as it started; the %s pool cannot stop "
                               "it: it is reported cancelled when it returns", self.id,
                               type(self._roger_pool).__name__)

    def on_retry(self, exc_info: Any) -> None:
        super().on_retry(exc_info)
        when = getattr(_unwrap(exc_info.exception), "when", None)
        if isinstance(when, (int, float)):
            wake_leases(when)

    def on_failure(self, exc_info: Any, send_failed_event: bool = True,
                   return_ok: bool = False) -> None:
        exc = _unwrap(exc_info.exception)
        failure: Exception | None = None
        if isinstance(exc, TimeLimitExceeded):
            failure = JobTimeout(f"hard time limit ({exc}s) exceeded")
        elif isinstance(exc, (WorkerLostError, SystemExit, KeyboardInterrupt)) and not (
            self._already_revoked or self._already_cancelled
        ):
            failure = WorkerCrashed(str(exc) or type(exc).__name__)
        if failure is None or self._roger_ended:
            super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)
            return
        self._roger_ended = True
        self._roger_end(failure, lambda: super(RogerRequest, self).on_failure(
            exc_info, send_failed_event=send_failed_event, return_ok=return_ok))

    def on_timeout(self, soft: bool, timeout: float) -> None:
        if soft or (self._roger_ended and not self._roger_retried):
            super().on_timeout(soft, timeout)
        elif not self._roger_ended:
            self._roger_ended = True
            self._roger_end(JobTimeout(f"hard time limit ({timeout}s) exceeded"),
                            lambda: super(RogerRequest, self).on_timeout(soft, timeout))

    def _roger_end(self, failure: Exception, celery_failure: Callable[[], None]) -> None:
        app = self.task.app
        ek, qk = job_keys(self.request_dict)
        success = getattr(self, "_success_was_stored", None)
        if isinstance(failure, WorkerCrashed) and success is not None and success():
            celery_failure()  # the job succeeded before its process died (Celery 5.7)
            _finish_quietly(app, self.id, ek, qk)
            return
        job = Job.from_request(self, started_at=self._roger_started_at or time.time())
        decision = record(self.task, job, self._roger_context(), failure, None,
                          headers=dict(self._message.headers or {}))
        if decision.kind == "retry":
            self._roger_retried = True
            task_ready(self)
            if self.store_errors:
                self.task.backend.mark_as_retry(self.id, failure, None,
                                                request=self._roger_context())
            if self.task.acks_late:
                self.acknowledge()
            self.send_event("task-retried", exception=safe_repr(failure), traceback="")
            wake_leases(decision.delay)
        else:
            celery_failure()
        _finish_quietly(app, self.id, ek, qk)
        runtime(app).callbacks.emit(self.task, "on_buried" if decision.kind == "bury"
                                    else "on_error", job, None, error=failure, traceback=None)

    def _roger_context(self) -> Any:
        context = getattr(self, "_context", None)
        if context is None:
            context = Context(self._request_dict, args=self.args, kwargs=self.kwargs)
        return context


def _kill(request: Any) -> None:
    pool = request._roger_pool
    try:
        pool.terminate_job(request.worker_pid, signal.SIGKILL)
        logger.error("Killed job %s: this worker lost its roger lease", request.id)
    except NotImplementedError:
        logger.error(
            "Job %s keeps running although this worker lost its roger lease: the %s pool "
            "cannot stop a running job", request.id, type(pool).__name__,
        )


class Admission:
    """Wraps ``Consumer.on_task_request``: roger jobs pass admit before the pool."""

    def __init__(self, consumer: Any, app: Celery, instance: str) -> None:
        self.consumer = consumer
        self.app = app
        self.store = runtime(app).store
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
        self.lease: WorkerLease | None = None
        self.queues = QueueControl(consumer, app)

    def __call__(self, request: Any) -> Any:
        from .task import RogerTask

        if not isinstance(request.task, RogerTask):
            return self.handle(request)
        return self.admit(request)

    def admit(self, request: Any) -> Any:
        problem = header_problem(request.request_dict)
        if problem is not None:
            logger.warning("Job %s[%s]: its roger header is malformed (%s); it runs as if "
                           "those parts were absent", request.name, request.id, problem)
        ek, qk = job_keys(request.request_dict)
        request._request_dict["roger_instance"] = self.instance
        if not ek:
            # Nothing to park it behind: it is admitted by its start check, in the job's
            # own process, so this event loop makes no Redis call for it.
            return self.handle(request)
        queue = job_header(request.request_dict).get("q")
        info = {
            "job": request.id, "task": request.name, "instance": self.instance,
            "worker": self.hostname, "pid": os.getpid(), "ek": ek, "qk": qk,
            "queue": queue if isinstance(queue, str) and queue
            else request.delivery_info.get("routing_key") or "",
            "admitted_at": time.time(), **small_arguments(request.args, request.kwargs),
        }
        try:
            admission = self.store.admit(
                request.id, instance=self.instance, execution_key=ek, info=info,
                message=capture(request.message) if ek else {},
            )
        except RedisError as exc:
            return self._admit_later(request, exc)
        self._retry_delay.pop(request.id, None)
        if admission.crashed is not None:
            self.crashed.append(admission.crashed)
        if admission.outcome == "run":
            request._roger_pool = self.consumer.pool
            request._roger_admitted = request._request_dict["roger_admitted"] = \
                time.monotonic()
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
                self.store.park_paused(request.id, info["queue"],
                                       {"raw": capture(request.message)})
                if ek:  # a promoted job hands its execution key on; it keeps its queue key
                    finish_job(self.app, request.id, execution_key=ek, queue_key="")
            except RedisError as exc:
                return self._admit_later(request, exc)
            logger.info("Held job %s[%s]: queue %r is paused", request.name, request.id,
                        info["queue"])
            return self._drop(request)
        logger.info(
            "Parked job %s[%s]: execution key %r is held by %s (position %d)",
            request.name, request.id, ek, admission.holder, admission.position,
        )
        events.send(self.app, "parked", request.id, execution_key=ek, holder=admission.holder,
                    position=admission.position)
        return self._drop(request)

    def _drop(self, request: Any) -> None:
        """The job is kept in Redis (or cancelled): ack its message, free its slot."""
        worker_state.task_ready(request)
        request.acknowledge()

    def report_cancel(self, task: Any, job: Job, request: Any = None) -> None:
        """Have the lease thread mark the job REVOKED and run on_cancel (not this loop)."""
        self.cancel_reports.append((task, job, request))
        if self.lease is not None:
            self.lease.wakeup.set()

    def _admit_later(self, request: Any, exc: Exception) -> None:
        """Redis is unreachable: keep the job (unacked) and try admitting it again."""
        delay = min(self._retry_delay.get(request.id, 0.5) * 2, 10.0)
        self._retry_delay[request.id] = delay
        logger.error(
            "Cannot admit job %s[%s] (Redis: %s); trying again in %.0fs",
            request.name, request.id, exc, delay,
        )
        self.consumer.timer.call_after(delay, self.admit, (request,))

    def forget_done(self) -> None:
        reserved = worker_state.reserved_requests
        for job_id, request in list(self.admitted.items()):
            if request not in reserved:
                del self.admitted[job_id]


def _local_job_ids() -> set[str]:
    """Ids of the requests this worker holds (received and not yet done)."""
    while True:
        try:
            return {request.id for request in list(worker_state.reserved_requests)}
        except RuntimeError:  # changed size while copied from another thread
            continue


def report_crash(app: Celery, info: dict[str, Any]) -> None:
    """Report (on_error, WorkerCrashed) an attempt whose worker died."""
    job_id = str(info.get("job"))
    task = app.tasks.get(str(info.get("task")))
    if task is None:
        return
    job = Job(id=job_id, task=task.name, args=tuple(info.get("args") or ()),
              kwargs=dict(info.get("kwargs") or {}), queue=str(info.get("queue") or ""),
              queue_key=_key(info.get("qk")) or None,
              execution_key=_key(info.get("ek")) or None,
              started_at=float(info.get("admitted_at") or 0))
    error = WorkerCrashed(f"worker {info.get('worker')} stopped renewing its lease")
    runtime(app).callbacks.emit(task, "on_error", job, None, error=error, traceback=None)


class WorkerLease(threading.Thread):
    """Renews this worker's lease and heals what dead workers left (main process)."""

    def __init__(self, app: Celery, admission: Admission) -> None:
        super().__init__(name="roger-lease", daemon=True)
        self.app = app
        self.admission = admission
        self.store = admission.store
        self.instance = admission.instance
        self.stopping = threading.Event()
        self.wakeup = threading.Event()
        self.next_wake: float | None = None  # monotonic time a retry is due
        self.lease = self.store.settings.lease_seconds
        # Stop this worker's jobs this long before its lease could run out.
        self.safety = max(TICK_SECONDS * 2, min(5.0, self.lease / 3))
        self.last_renewed = time.monotonic()
        self.lease_lost = False
        # When to compare what Redis records as running here with what runs here: after
        # any Redis error (a finish may have failed with it) and once per lease period.
        self.reconcile_at = time.monotonic() + self.lease

    def run(self) -> None:
        while not self.stopping.is_set():
            timeout = TICK_SECONDS
            if self.next_wake is not None:
                timeout = max(0.0, min(timeout, self.next_wake - time.monotonic()))
            woken = self.wakeup.wait(timeout)
            self.wakeup.clear()
            if self.stopping.is_set():
                break
            if woken and (self.admission.cancel_reports or self.admission.revoked_ids) and (
                    self.next_wake is None or self.next_wake > time.monotonic()):
                self._report_local()  # a cancellation to report: no need for a full tick
            else:
                self.tick()

    def wake_in(self, seconds: float) -> None:
        """Tick again in ``seconds`` (a retry is due then), or sooner."""
        at = time.monotonic() + seconds
        if self.next_wake is None or at < self.next_wake:
            self.next_wake = at
            self.wakeup.set()

    def tick(self, *, deregister: bool = False) -> None:
        sent = time.monotonic()
        try:
            result = self.store.tick(self.instance, deregister=deregister)
        except RedisError as exc:
            self.admission.forget_done()
            self.reconcile_at = 0.0
            if sent - self.last_renewed > self.lease - self.safety and not self.lease_lost:
                self._lose_lease(exc)
            else:
                logger.warning("roger: cannot renew this worker's lease: %s", exc)
            return
        self.last_renewed = sent
        self.lease_lost = False
        self.admission.forget_done()
        self.next_wake = (None if result.next_retry_in is None
                          else time.monotonic() + result.next_retry_in)
        for info in result.orphans:
            self._orphan(info)
        crashed = [*result.crashed]
        while self.admission.crashed:
            crashed.append(self.admission.crashed.popleft())
        for info in crashed:
            logger.warning("Job %s was redelivered: its attempt on %s ended with that worker",
                           info.get("job"), info.get("worker"))
            report_crash(self.app, info)
        publish_due(self.app, result.due_retries)
        self.admission.queues.reconcile(result.paused)
        for queue in result.stale_paused:
            released = self.store.resume(queue, release_only=True)
            if released:
                publish_due(self.app, self.store.take_due())
        for report in result.cancel_reports:
            job_id = str(report.get("job"))
            stored = loads(report["stored"]) if isinstance(report.get("stored"), str) else {}
            job = job_from_stored(self.app, job_id, stored)
            logger.info("Cancelled job %s[%s] (it waited: %s)", job.task, job_id,
                        report.get("where"))
            self._cancelled(self.app.tasks.get(job.task), job,
                            request_from_stored(self.app, job_id, stored))
        self._report_local()
        for promotion in result.republish:
            hand_off(self.app, promotion)
        for queue_key in result.freed_queue_keys:
            logger.warning("Freed queue key %r: its publisher never confirmed the job", queue_key)
        if time.monotonic() >= self.reconcile_at:
            self.reconcile()

    def reconcile(self) -> None:
        """Finish attempts recorded as running here that no longer run here.

        A job's own process releases its keys when it ends; if Redis was unreachable just
        then, the record stays, and with it the job's execution key, while this worker's
        lease is alive. Such records are finished here (keys released, the next parked job
        promoted), at most one lease period after the job ended.
        """
        self.reconcile_at = time.monotonic() + self.lease
        try:
            recorded = self.store.running_on(self.instance)
        except RedisError as exc:
            self.reconcile_at = 0.0
            logger.warning("roger: cannot compare running jobs with Redis: %s", exc)
            return
        if not recorded:
            return
        here = _local_job_ids()
        young = time.time() - RECONCILE_MIN_AGE_SECONDS
        for job_id, info in recorded.items():
            if job_id in here or float(info.get("admitted_at") or 0) > young:
                continue
            logger.warning("Job %s ended on this worker but its keys were still held "
                           "(Redis was unreachable at its end): releasing them", job_id)
            _finish_quietly(self.app, job_id, _key(info.get("ek")), _key(info.get("qk")))

    def _report_local(self) -> None:
        """Cancellations seen by this worker's event loop: Redis work and callbacks here."""
        while self.admission.revoked_ids:
            job_id = self.admission.revoked_ids.popleft()
            try:
                self.store.cancel(job_id)
            except RedisError as exc:
                logger.warning("could not record Celery's revoke of %s: %s", job_id, exc)
        while self.admission.cancel_reports:
            self._cancelled(*self.admission.cancel_reports.popleft())

    def _cancelled(self, task: Any, job: Job, request: Any = None) -> None:
        """Store REVOKED and run on_cancel. ``request``: the job's request, to count it in
        its chord; None where Celery has already done that (its own revoke)."""
        backend = (task or self.app).backend
        try:
            backend.mark_as_revoked(job.id, "cancelled", request=request)
        except Exception:
            logger.exception("could not store REVOKED for job %s", job.id)
        events.send(self.app, "cancelled", job.id)
        runtime(self.app).callbacks.emit(task, "on_cancel", job)

    def _orphan(self, info: dict[str, Any]) -> None:
        """A job whose worker died: its keys are freed; its message is redelivered."""
        job_id = str(info.get("job"))
        logger.warning("Job %s was running on %s, whose lease expired: releasing its keys",
                       job_id, info.get("worker"))
        if _finish_quietly(self.app, job_id, _key(info.get("ek")), _key(info.get("qk"))):
            report_crash(self.app, info)  # else another worker's tick reported it

    def _lose_lease(self, exc: Exception) -> None:
        self.lease_lost = True
        logger.error(
            "roger: lease not renewed for %.0fs (Redis: %s); stopping this worker's roger jobs",
            time.monotonic() - self.last_renewed, exc,
        )
        for request in list(self.admission.admitted.values()):
            request._roger_lease_lost = True
            if request._roger_started:
                _kill(request)

    def stop(self) -> None:
        self.stopping.set()
        self.wakeup.set()


def _check_credentials(app: Celery) -> None:
    """Stop the worker at start if roger's Redis refuses its credentials: a setting to
    fix, not an outage to wait out (the lease thread waits out an unreachable Redis)."""
    store = runtime(app).store
    try:
        store.redis.ping()
    except AuthenticationError as exc:
        raise ConfigurationError(
            f"setting roger_redis_url: Redis at {redact_url(store.settings.redis_url)} "
            f"refused the credentials: {exc}"
        ) from exc
    except RedisError:
        pass


class RogerConsumerStep(bootsteps.StartStopStep):
    """Installs admission and starts the lease thread before the worker consumes."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.lease: WorkerLease | None = None

    def start(self, c: Any) -> None:
        runtime(c.app).callbacks  # noqa: B018 (a bad roger_callbacks stops the worker here)
        _check_credentials(c.app)
        if not isinstance(c.on_task_request, Admission):
            instance = f"{c.hostname}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
            c.on_task_request = Admission(c, c.app, instance)
            c.update_strategies()
        c.on_task_request.queues.start()
        if self.lease is None:
            self.lease = WorkerLease(c.app, c.on_task_request)
            c.on_task_request.lease = self.lease
            self.lease.tick()
            self.lease.start()
            _leases.append(self.lease)

    def shutdown(self, c: Any) -> None:
        if self.lease is not None:
            self.lease.stop()


_leases: list[WorkerLease] = []


def _admission(app: Celery) -> Admission | None:
    for lease in _leases:
        if lease.app is app:
            return lease.admission
    return None


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


def wake_leases(seconds: float) -> None:
    """A retry is due in ``seconds``: have this process's lease thread tick then."""
    for lease in list(_leases):
        lease.wake_in(seconds)


@signals.worker_shutdown.connect(weak=False, dispatch_uid="celery_roger.worker_shutdown")
def _deregister(**_: Any) -> None:
    """The pool has stopped: give back what this worker holds, without waiting a lease."""
    while _leases:
        lease = _leases.pop()
        lease.stop()
        for request in list(lease.admission.admitted.values()):
            if not request._roger_started:
                # Never started: its message goes back to the broker, so it keeps its
                # queue key; only its execution key is handed on.
                _finish_quietly(lease.app, request.id, job_keys(request.request_dict)[0], "")
        lease.tick(deregister=True)


@signals.task_postrun.connect(weak=False, dispatch_uid="celery_roger.task_postrun")
def _attempt_ended(sender: Any = None, task_id: str = "", retval: Any = None,
                   state: str = "", **_: Any) -> None:
    """The attempt ended in the job's process, its result stored: release the keys
    (promoting the next parked job), then run after_run / on_error / on_buried."""
    from .task import RogerTask

    if not isinstance(sender, RogerTask) or sender.request.is_eager:
        return
    request = sender.request
    ek, qk = job_keys(request)
    attempt = getattr(request, "_roger_attempt", None)
    # A job held for its paused queue is still pending: it keeps its queue key.
    _finish_quietly(sender.app, task_id, ek, "" if attempt and attempt.paused else qk)
    if attempt is None:
        return
    callbacks = runtime(sender.app).callbacks
    if attempt.cancelled:
        if attempt.report_cancel:
            events.send(sender.app, "cancelled", attempt.job.id)
            callbacks.emit(sender, "on_cancel", attempt.job)
        return
    if attempt.paused:
        return
    states = None if attempt.timed_out else attempt.states
    if state == states_.SUCCESS:
        callbacks.emit(sender, "after_run", attempt.job, states, result=retval)
    elif state in (states_.FAILURE, states_.RETRY):
        error = attempt.error
        if error is None:
            error = retval.exc if isinstance(retval, Retry) else retval
        name = "on_buried" if attempt.decision and attempt.decision.kind == "bury" else "on_error"
        callbacks.emit(sender, name, attempt.job, states, error=error,
                       traceback=attempt.traceback)


@signals.task_revoked.connect(weak=False, dispatch_uid="celery_roger.task_revoked")
def _revoked(sender: Any = None, request: Any = None, **_: Any) -> None:
    """Celery revoked the job (revoke, terminate, expires): free what it holds."""
    from .task import RogerTask

    if not isinstance(sender, RogerTask) or request is None:
        return
    ek, qk = job_keys(request)
    _finish_quietly(sender.app, request.id, ek, qk)
    try:
        report = runtime(sender.app).store.claim_cancel(request.id)
    except RedisError as exc:
        logger.warning("could not record the revoke of %s: %s", request.id, exc)
        return
    if report:
        admission = _admission(sender.app)
        job = Job.from_request(request, started_at=getattr(request, "_roger_started_at", 0.0))
        if admission is not None:
            admission.report_cancel(sender, job)
        else:
            runtime(sender.app).callbacks.emit(sender, "on_cancel", job)


@signals.task_rejected.connect(weak=False, dispatch_uid="celery_roger.task_rejected")
def _rejected(sender: Any = None, message: Any = None, exc: Any = None, **_: Any) -> None:
    """The worker refused a job's message (content it does not accept, a malformed
    message) and dropped it: its keys are freed and, unlike Celery, which stores nothing
    then, its state becomes FAILURE."""
    if _refused(sender, message) and isinstance(exc, Exception):
        try:
            sender.app.backend.mark_as_failure(message.headers["id"], exc)
        except Exception:
            logger.exception("could not store FAILURE for job %s", message.headers["id"])


@signals.task_unknown.connect(weak=False, dispatch_uid="celery_roger.task_unknown")
def _unknown(sender: Any = None, message: Any = None, **_: Any) -> None:
    """The worker does not know the job's task and dropped it (Celery stores FAILURE)."""
    _refused(sender, message)


def _refused(sender: Any, message: Any) -> bool:
    """Free the keys of a roger job whose message this worker dropped unseen by roger;
    returns whether it was a roger job."""
    app = getattr(sender, "app", None)
    headers = getattr(message, "headers", None)
    if app is None or "_roger_runtime" not in app.__dict__ or not isinstance(headers, dict) \
            or not job_header(headers) or not isinstance(headers.get("id"), str):
        return False
    ek, qk = job_keys(headers)
    if ek or qk:
        logger.warning("Job %s[%s] was refused by this worker: releasing its keys",
                       headers.get("task"), headers["id"])
        _finish_quietly(app, headers["id"], ek, qk)
    return True


@signals.worker_init.connect(weak=False, dispatch_uid="celery_roger.worker_init")
def _events_on(sender: Any = None, **_: Any) -> None:
    """``celery worker -E``: roger's task events are on in this worker and its pool."""
    if getattr(sender, "task_events", False) and sender.app is not None:
        sender.app.conf.worker_send_task_events = True


@signals.worker_process_init.connect(weak=False, dispatch_uid="celery_roger.process_init")
def _die_with_parent(**_: Any) -> None:
    """A pool process must not outlive its worker: its keys are freed when the worker dies."""
    if os.uname().sysname == "Linux":
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            logger.debug("prctl(PR_SET_PDEATHSIG) unavailable")


def install_worker_parts(app: Celery) -> None:
    """Register the consumer bootstep on ``app`` (signal receivers are global)."""
    app.steps["consumer"].add(RogerConsumerStep)
    guard_redis_transport()


__all__ = ["RogerConsumerStep", "RogerRequest", "finish_job", "hand_off", "install_worker_parts"]
