"""The worker's request class for roger jobs (``RogerTask.Request``): the main-process
ends of an attempt that the job's own process never reports (its process died, the hard
time limit, the worker lost its lease)."""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from billiard.einfo import ExceptionInfo, ExceptionWithTraceback
from billiard.exceptions import Terminated
from celery.app.task import Context
from celery.exceptions import TimeLimitExceeded, WorkerLostError
from celery.utils.saferepr import saferepr as safe_repr
from celery.worker.request import Request
from celery.worker.state import revoked as revoked_ids
from celery.worker.state import task_ready

from . import events
from .errors import JobTimeout, WorkerCrashed
from .failure import is_buried, record
from .job import FRESH_ADMISSION_SECONDS, Job, job_keys
from .lease import POOL_SLOTS
from .lifecycle import finish_quietly, report
from .runtime import runtime, wake_healers

logger = logging.getLogger("celery_roger")


def _unwrap(exc: BaseException) -> BaseException:
    return exc.exc if isinstance(exc, ExceptionWithTraceback) else exc


@dataclass
class Watch:
    """What the worker's main process knows of one roger attempt (``RogerRequest.roger_watch``),
    carried across Celery's hooks: admission, the pool's accept, the lease, the end."""

    #: the pool that runs it, and when it was admitted (monotonic), set by admission
    pool: Any = None
    admitted: float = 0.0
    #: the pool accepted it, and when (Unix time)
    started: bool = False
    started_at: float = 0.0
    #: this worker lost its lease while the job waited or ran: it is stopped
    lease_lost: bool = False
    #: stopped as it started, never having run (it goes back to its queue)
    killed_at_start: bool = False
    #: cancelled while it waited for a pool slot: stopped as it starts
    cancel_on_start: bool = False
    #: roger has recorded its end (one ending per attempt), and whether as a retry
    ended: bool = False
    retried: bool = False
    #: the attempt ended the job in the buried queue: Celery's task-failed says "Buried:"
    buried: bool = False


class RogerRequest(Request):
    """Main-process ends of an attempt that the job's own process never reports.

    A child that died (worker lost) or was killed at the hard time limit: roger records
    a retry or burial here, releases the keys, and runs ``on_error``/``on_buried`` with
    ``state=None``. A retry is stored as Celery's ``RETRY`` state, not ``FAILURE``.
    """

    @property
    def roger_watch(self) -> Watch:
        """What roger's worker side knows of this attempt (one object, made on first use)."""
        watch = self.__dict__.get("_roger")
        if watch is None:
            watch = self.__dict__["_roger"] = Watch()
        return watch

    def on_accepted(self, pid: int, time_accepted: float) -> None:
        super().on_accepted(pid, time_accepted)
        watch = self.roger_watch
        watch.started = True
        watch.started_at = time.time()
        if watch.lease_lost:
            # The worker lost its lease while this job waited for a pool slot: it goes
            # back to its queue (see on_failure), never having run.
            watch.killed_at_start = True
            kill_job(self)
        elif watch.cancel_on_start and \
                time_accepted - watch.admitted < FRESH_ADMISSION_SECONDS:
            # Cancelled while it waited for this slot, and fresh enough to start without
            # its start check: stop it now.
            try:
                self.terminate(watch.pool, signal=signal.SIGKILL)
            except NotImplementedError:
                logger.warning("Job %s was cancelled as it started; the %s pool cannot stop "
                               "it: it is reported cancelled when it returns", self.id,
                               type(watch.pool).__name__)

    def send_event(self, type: str, **fields: Any) -> None:
        if type == "task-failed" and self.roger_watch.buried:
            fields["exception"] = events.buried_exception(str(fields.get("exception") or ""))
        super().send_event(type, **fields)

    def on_retry(self, exc_info: Any) -> None:
        super().on_retry(exc_info)
        when = getattr(_unwrap(exc_info.exception), "when", None)
        if isinstance(when, (int, float)):
            wake_healers(when)

    def on_failure(self, exc_info: Any, send_failed_event: bool = True,
                   return_ok: bool = False) -> None:
        exc = _unwrap(exc_info.exception)
        failure: Exception | None = None
        watch = self.roger_watch
        if send_failed_event and self.task.send_events and self._eventer is not None and \
                self._eventer.enabled and is_buried(self.task, exc, self.id):
            watch.buried = True
        # Killed without a revoke or a cancel aimed at it (roger's lease kill, or a kill
        # by hand): a crash of this attempt, never REVOKED and never a cancellation.
        killed_unasked = isinstance(exc, Terminated) and not (
            self._already_revoked or self._already_cancelled or self.id in revoked_ids)
        stopped_by_roger = watch.lease_lost and killed_unasked
        if stopped_by_roger and watch.killed_at_start and not watch.ended:
            watch.ended = True
            logger.warning("Job %s[%s] goes back to its queue: this worker lost its roger "
                           "lease before the job could start", self.name, self.id)
            task_ready(self)
            self.reject(requeue=True)
            finish_quietly(self.task.app, self.id, job_keys(self.request_dict)[0], "",
                           instance=self.request_dict.get("roger_instance"))
            return
        if isinstance(exc, TimeLimitExceeded):
            failure = JobTimeout(f"hard time limit ({exc}s) exceeded")
        elif stopped_by_roger:
            # Killed because this worker lost its lease: a crash of this attempt (retried
            # or failed), never a cancellation, which Celery would make of Terminated.
            failure = WorkerCrashed("stopped: this worker lost its roger lease")
            exc_info = _exception_info(failure)
        elif killed_unasked or (isinstance(exc, (WorkerLostError, SystemExit,
                                                 KeyboardInterrupt)) and not (
                self._already_revoked or self._already_cancelled)):
            if killed_unasked:
                failure = WorkerCrashed(f"its process was killed ({exc!r})")
                exc_info = _exception_info(failure)
            else:
                failure = WorkerCrashed(str(exc) or type(exc).__name__)
        if failure is None or watch.ended:
            super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)
            return
        watch.ended = True
        self._roger_end(failure, lambda: super(RogerRequest, self).on_failure(
            exc_info, send_failed_event=send_failed_event, return_ok=return_ok))

    def on_timeout(self, soft: bool, timeout: float) -> None:
        if soft or (self.roger_watch.ended and not self.roger_watch.retried):
            super().on_timeout(soft, timeout)
        elif not self.roger_watch.ended:
            self.roger_watch.ended = True
            self._roger_end(JobTimeout(f"hard time limit ({timeout}s) exceeded"),
                            lambda: super(RogerRequest, self).on_timeout(soft, timeout))

    def _roger_end(self, failure: Exception, celery_failure: Callable[[], None]) -> None:
        app = self.task.app
        ek, qk = job_keys(self.request_dict)
        instance = self.request_dict.get("roger_instance")
        success = getattr(self, "_success_was_stored", None)
        if isinstance(failure, WorkerCrashed) and success is not None and success():
            celery_failure()  # the job succeeded before its process died (Celery 5.7)
            finish_quietly(app, self.id, ek, qk, instance=instance)
            return
        job = Job.from_request(self, started_at=self.roger_watch.started_at or time.time())
        decision = record(self.task, job, self._roger_context(), failure, None,
                          headers=dict(self._message.headers or {}))
        if decision.kind == "unrecorded":
            # Redis could not record the retry (an outage, the one that cost the lease,
            # say): the job goes back to the broker instead, to run again.
            task_ready(self)
            self.reject(requeue=True)
            finish_quietly(app, self.id, ek, "", instance=instance)
            return
        if decision.kind == "retry":
            self.roger_watch.retried = True
            task_ready(self)
            if self.store_errors:
                self.task.backend.mark_as_retry(self.id, failure, None,
                                                request=self._roger_context())
            if self.task.acks_late:
                self.acknowledge()
            self.send_event("task-retried", exception=safe_repr(failure), traceback="")
            wake_healers(decision.delay)
        else:
            self.roger_watch.buried = decision.kind == "bury"
            celery_failure()
        finish_quietly(app, self.id, ek, qk, instance=instance)
        report(app, f"{decision.kind} report of job {job.id}", runtime(app).callbacks.emit,
               self.task, "on_buried" if decision.kind == "bury" else "on_error", job, None,
               error=failure, traceback=None)

    def _roger_context(self) -> Any:
        context = getattr(self, "_context", None)
        if context is None:
            context = Context(self._request_dict, args=self.args, kwargs=self.kwargs)
        return context


def _exception_info(error: BaseException) -> ExceptionInfo:
    try:
        raise error
    except BaseException:
        return ExceptionInfo()


def kill_job(request: Any) -> None:
    """Kill the pool process running ``request`` (this worker lost its lease), unless that
    process is known to run another job by now (see ``PoolSlots``)."""
    pool = request.roger_watch.pool
    pid = request.worker_pid
    if isinstance(pid, int) and POOL_SLOTS.runs_other(pid, request.id):
        logger.info("Job %s has already ended: its process runs another job now, which is "
                    "left alone", request.id)
        return
    try:
        pool.terminate_job(request.worker_pid, signal.SIGKILL)
        logger.error("Killed job %s: this worker lost its roger lease", request.id)
    except NotImplementedError:
        logger.error(
            "Job %s keeps running although this worker lost its roger lease: the %s pool "
            "cannot stop a running job", request.id, type(pool).__name__,
        )
