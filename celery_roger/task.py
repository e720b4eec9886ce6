"""``RogerTask``: the base class that gives a Celery task roger's job semantics."""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from celery import Celery, Task
from celery import states as states_
from celery.exceptions import Ignore, Reject, Retry
from redis.exceptions import RedisError

from . import events, keys
from .compose import RogerTaskType
from .config import retry_levels
from .deferred import DEFERRED
from .errors import ConfigurationError, JobAborted, JobTimeout
from .failure import (
    Decision,
    describe,
    format_traceback,
    mark_buried,
    publish_entry,
    record,
)
from .install import install
from .job import FRESH_ADMISSION_SECONDS, Job, job_keys, small_arguments
from .lease import in_pool_process
from .lifecycle import ended_as, finish_quietly, report_crash
from .publish import UNSET, republishing
from .records import compact
from .runtime import runtime

logger = logging.getLogger("celery_roger")


def control_flow(exc: BaseException) -> bool:
    """Whether ``exc`` stops a process or a green thread rather than fails a job
    (``SystemExit``, Celery's worker shutdown included, ``KeyboardInterrupt``,
    ``GeneratorExit``, gevent's and eventlet's ``GreenletExit``): it passes through roger's
    failure handling untouched, as in Celery (a pool process that exits is a crash of the
    attempt, which its worker handles as ``WorkerCrashed``)."""
    if isinstance(exc, (SystemExit, KeyboardInterrupt, GeneratorExit)):
        return True
    exit_type = getattr(sys.modules.get("greenlet"), "GreenletExit", None)
    return isinstance(exit_type, type) and isinstance(exc, exit_type)


@dataclass
class Attempt:
    """One attempt of a job in its own process: what the end-of-attempt hook needs."""

    job: Job
    states: list[Any] = field(default_factory=list)
    decision: Decision | None = None
    error: BaseException | None = None
    traceback: str | None = None
    timed_out: bool = False
    #: Stopped before or after its body because it was cancelled; report: run on_cancel.
    cancelled: bool = False
    report_cancel: bool = False
    #: Put back for its paused queue: it keeps its queue key.
    paused: bool = False
    #: The running record its start check wrote (a job without an execution key).
    record: str = ""


class RogerTask(Task, metaclass=RogerTaskType):
    """Base class for roger jobs: ``@app.task(base=RogerTask, queue_key=..., ...)``.

    ``queue_key`` / ``execution_key``: None, a str, a callable called with the job's
    own arguments (``fn(*args, **kwargs)``) returning a str or None, ``True`` (the task's
    name and all its arguments) or ``keys.args("a", ...)`` (the name and those arguments;
    keys.py). Subclasses may override ``get_queue_key`` / ``get_execution_key`` instead.
    ``apply_async`` takes per-call ``queue_key=`` / ``execution_key=`` / ``on_duplicate=``
    that win over the task's own.
    """

    queue_key: ClassVar[Any] = None
    execution_key: ClassVar[Any] = None
    #: What publishing a job whose queue key is held does: "raise" DuplicateJob, return
    #: the "existing" job's AsyncResult (use it for tasks sent by celery beat), or
    #: "replace" it (the newest publish wins: debounce).
    #: None: the ``roger_on_duplicate`` setting ("raise" unless set).
    on_duplicate: ClassVar[str | None] = None
    #: When the queue key goes: "end" (the attempt ends), "start" (the attempt starts: a
    #: new publish is accepted while it runs) or seconds (a throttle window counted from
    #: the accepted publish, and at least until the attempt ends).
    queue_key_until: ClassVar[str | float] = "end"
    #: How many jobs of one execution key may run at once, cluster-wide.
    execution_limit: ClassVar[int] = 1
    #: At most N starts per window across the cluster ("N/s", "N/m", "N/h"), per rate key.
    rate: ClassVar[str | None] = None
    #: The key a ``rate`` counts starts under (a key spec); None: the task's name.
    rate_key: ClassVar[Any] = None
    #: Retry on any failure (exception, timeout, crash) along ``retry_levels``.
    retryable: ClassVar[bool] = False
    #: Retry delays in seconds for this task; None = the ``roger_retry_levels`` setting.
    retry_levels: ClassVar[Any] = None
    #: Seconds an attempt may run: a hard limit (prefork kills the job), a JobTimeout.
    max_execution_time: ClassVar[float | None] = None
    acks_late = True
    Request = "celery_roger.request:RogerRequest"
    #: What the layers below read to tell a roger task (``job.is_roger_task``).
    roger_task: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Celery turns task options into class attributes, where a plain function would
        # bind as a method; keep key callables as they were given.
        for kind in keys.KINDS:
            spec = cls.__dict__.get(kind)
            if callable(spec) and not isinstance(spec, staticmethod):
                setattr(cls, kind, staticmethod(spec))
        name = cls.__dict__.get("name") or cls.__name__
        keys.check_declaration(cls, name, has_run=cls.run is not Task.run)
        if cls.__dict__.get("retry_levels") is not None:
            cls.retry_levels = retry_levels(f"{name}: retry_levels", cls.retry_levels)
        if "execution_limit" in cls.__dict__:
            cls.execution_limit = keys.execution_limit(name, cls.__dict__["execution_limit"])
        if cls.__dict__.get("rate") is not None:
            keys.rate(name, cls.__dict__["rate"])
        if "queue_key_until" in cls.__dict__:
            cls.queue_key_until = keys.queue_key_until(name, cls.__dict__["queue_key_until"])
        limit = cls.__dict__.get("max_execution_time")
        if limit is not None:
            if isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0:
                raise ConfigurationError(
                    f"{name}: max_execution_time must be a number of seconds > 0, got {limit!r}"
                )
            if cls.__dict__.get("time_limit") is None:
                cls.time_limit = limit

    @classmethod
    def on_bound(cls, app: Celery) -> None:
        install(app)

    def roger_retry_levels(self) -> tuple[float, ...]:
        if self.retry_levels is not None:
            return tuple(self.retry_levels)
        return runtime(self._get_app()).settings.retry_levels

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if request.called_directly or request.is_eager:
            return super().__call__(*args, **kwargs)
        # A worker attempt: before_run, the body, and roger's failure handling. The
        # end of the attempt (keys, then after_run / on_error / on_buried) is in the
        # task_postrun hook, after Celery has stored the result.
        rt = runtime(self.app)
        job = Job.from_request(request)
        attempt = request._roger_attempt = Attempt(job)
        self._roger_start_check(attempt, request, args, kwargs)
        attempt.states = rt.callbacks.before_run(self, attempt.job)
        try:
            result = super().__call__(*args, **kwargs)
        except (Retry, Ignore, Reject):
            raise  # Celery's own flow (self.retry(), Ignore, Reject) goes on as in Celery
        except Exception as exc:
            self._roger_failed(attempt, request, exc, format_traceback(exc))
            raise
        except BaseException as exc:
            if control_flow(exc):
                raise
            # asyncio's CancelledError, a library's own BaseException: Celery would let it
            # escape its failure handling (no retry, no callback, keys left to the lease).
            # Roger fails the attempt with it; Celery stores JobAborted in its place.
            aborted = JobAborted(describe(exc))
            traceback = format_traceback(exc)
            self._roger_failed(attempt, request, exc, traceback, raised=aborted)
            raise aborted from exc
        if getattr(request, "_roger_cancel_seen", False) or (
                not in_pool_process() and rt.store.is_cancelled(request.id)):
            # It saw its cancel and stopped early, or its pool (threads, solo) could not
            # kill it: it is reported cancelled now, its result discarded.
            self._roger_cancelled(attempt, request, rt.store.claim_cancel(request.id))
        limit = self.max_execution_time
        elapsed = time.time() - attempt.job.started_at
        if limit is not None and elapsed > limit:
            # A pool that cannot kill the job (threads, solo) reports the timeout now.
            timeout = JobTimeout(f"ran {elapsed:.1f}s, over max_execution_time={limit}s")
            attempt.timed_out = True
            self._roger_failed(attempt, request, timeout, None)
            raise timeout
        return result

    def _roger_start_check(self, attempt: Attempt, request: Any, args: Any,
                           kwargs: Any) -> None:
        """What changed since admission (a cancel, a pause of the job's queue), unless the
        job was admitted a moment ago (see FRESH_ADMISSION_SECONDS). A job without an
        execution key or rate key is admitted here, in its own process, off the worker's
        event loop."""
        job = attempt.job
        admitted = getattr(request, "roger_admitted", None)
        if job.admitted_by_worker and isinstance(admitted, float) and \
                time.monotonic() - admitted < FRESH_ADMISSION_SECONDS:
            return
        record = ""
        instance = getattr(request, "roger_instance", None) or ""
        if not job.admitted_by_worker and instance:
            record = compact({
                "job": job.id, "task": job.task, "instance": instance,
                "worker": request.hostname, "pid": os.getpid(), "ek": "",
                "qk": job.queue_key or "", "queue": job.queue, "admitted_at": job.started_at,
                **small_arguments(args, kwargs)})
        store = runtime(self.app).store
        ended = DEFERRED.take(store)
        try:
            outcome, report, crashed = store.start(
                request.id, job.queue, record, instance, job.queue_key or "",
                qk_release=job.queue_key_at_start,
                done=ended.args() if ended else None)
        except RedisError as exc:
            DEFERRED.give_back(ended)
            # Neither run nor dropped: back to the broker, after a pause.
            logger.error("Cannot start job %s[%s] (Redis: %s); it goes back to its "
                         "queue", job.task, job.id, exc)
            time.sleep(1.0)
            raise Reject(exc, requeue=True) from exc
        if crashed is not None:
            report_crash(self.app, crashed)
        if outcome == "cancelled":
            self._roger_cancelled(attempt, request, report)
        if outcome == "paused":
            self._roger_hold_for_pause(attempt, request)
        attempt.record = record

    def roger_end_attempt(self, task_id: str, retval: Any, state: str) -> None:
        """The attempt ended in the job's process, its result stored (``task_postrun``):
        release the keys (promoting the next parked job), then run after_run / on_error /
        on_buried, or on_cancel."""
        request = self.request
        ek, qk = job_keys(request)
        attempt = getattr(request, "_roger_attempt", None)
        outcome = ended_as(attempt, state)
        if attempt is not None and attempt.record and not (ek or qk) and in_pool_process():
            # Nothing to release: its process's next start forgets it as running.
            DEFERRED.put(runtime(self.app).store, task_id, attempt.record, outcome)
        else:
            # A job held for its paused queue is still pending: it keeps its queue key.
            finish_quietly(self.app, task_id, ek, "" if attempt and attempt.paused else qk,
                           instance=getattr(request, "roger_instance", None),
                           outcome=outcome)
        if attempt is None:
            return
        callbacks = runtime(self.app).callbacks
        if attempt.cancelled:
            if attempt.report_cancel:
                events.revoked(self.app, attempt.job.id)
                callbacks.emit(self, "on_cancel", attempt.job)
            return
        if attempt.paused:
            return
        states = None if attempt.timed_out else attempt.states
        if state == states_.SUCCESS:
            callbacks.emit(self, "after_run", attempt.job, states, result=retval)
        elif state in (states_.FAILURE, states_.RETRY):
            error = attempt.error
            if error is None:
                error = retval.exc if isinstance(retval, Retry) else retval
            name = "on_buried" if attempt.decision and attempt.decision.kind == "bury" \
                else "on_error"
            callbacks.emit(self, name, attempt.job, states, error=error,
                           traceback=attempt.traceback)

    def is_cancelled(self) -> bool:
        """Whether this job was cancelled (for pools that cannot kill it: threads, solo).

        A job that saw True and returns is reported cancelled (REVOKED, on_cancel).
        """
        cancelled = runtime(self.app).store.is_cancelled(self.request.id)
        if cancelled:
            self.request._roger_cancel_seen = True
        return cancelled

    def _roger_failed(self, attempt: Attempt, request: Any, exc: BaseException,
                      traceback: str | None, *, raised: Exception | None = None) -> None:
        """``raised``: what Celery sees in place of ``exc`` (when that is not an Exception)."""
        attempt.error, attempt.traceback = exc, traceback
        attempt.decision = record(self, attempt.job, request, exc, traceback)
        if attempt.decision.kind == "unrecorded":
            raise Reject(raised or exc, requeue=True) from exc
        if attempt.decision.kind == "retry":
            raise Retry(exc=raised or exc, when=attempt.decision.delay) from exc
        if attempt.decision.kind == "bury":
            # The worker's request reads the mark (across the pool's pipe: an exception
            # pickles its attributes) and reports the failure as "Buried: ...".
            mark_buried(raised or exc, request.id)
        if attempt.decision.kind == "cancelled":
            self._roger_cancelled(attempt, request, runtime(self.app).store.claim_cancel(
                request.id))

    def _roger_cancelled(self, attempt: Attempt, request: Any, report: bool) -> None:
        """End the attempt as cancelled: REVOKED, no retry; on_cancel follows (postrun)."""
        attempt.cancelled, attempt.report_cancel = True, report
        self.backend.mark_as_revoked(request.id, "cancelled", request=request)
        raise Ignore("cancelled")

    def _roger_hold_for_pause(self, attempt: Attempt, request: Any) -> None:
        """Its queue was paused after admission: keep it in Redis until resume."""
        store = runtime(self.app).store
        header = attempt.job.header(attempt.job.retry_count, store.partition)
        store.hold(request.id, attempt.job.queue, publish_entry(self, request, header))
        attempt.paused = True
        events.step(self.app, "held", request.id, queue=attempt.job.queue)
        raise Ignore("queue paused")

    def retry(self, *args: Any, **kwargs: Any) -> Any:
        """Celery's ``retry`` (also used by ``autoretry_for``): the job is published again
        as it was (its ``roger`` header kept: same keys, no queue key taken)."""
        job_id = self.request.id
        if not job_id:
            return super().retry(*args, **kwargs)
        with republishing(job_id):
            return super().retry(*args, **kwargs)

    def get_queue_key(self, *args: Any, **kwargs: Any) -> str | None:
        return keys.compute(self.queue_key, args, kwargs, self, "queue_key")

    def get_execution_key(self, *args: Any, **kwargs: Any) -> str | None:
        return keys.compute(self.execution_key, args, kwargs, self, "execution_key")

    def roger_keys(self, args: tuple, kwargs: dict, *, queue_key: Any = UNSET,
                   execution_key: Any = UNSET) -> tuple[str | None, str | None]:
        """The (queue key, execution key) of a job with these arguments, validated."""
        qk = (self.get_queue_key(*args, **kwargs) if queue_key is UNSET
              else keys.compute(queue_key, args, kwargs, self, "queue_key"))
        ek = (self.get_execution_key(*args, **kwargs) if execution_key is UNSET
              else keys.compute(execution_key, args, kwargs, self, "execution_key"))
        return (keys.validate(self.name, "queue_key", qk),
                keys.validate(self.name, "execution_key", ek))

    def roger_rate(self, args: tuple, kwargs: dict, *, rate_key: Any = UNSET,
                   rate: Any = UNSET) -> tuple[str, tuple[int, int]] | None:
        """The (rate key, (starts, window ms)) of a job with these arguments, or None when
        it has no rate. The rate key defaults to the task's name."""
        limit = keys.rate(self.name, self.rate if rate is UNSET else rate)
        if limit is None:
            return None
        spec = self.rate_key if rate_key is UNSET else rate_key
        key = keys.compute(spec, args, kwargs, self, "rate_key") if spec is not None else None
        return keys.validate(self.name, "rate_key", key) or self.name, limit

    def apply_async(self, args: Any = None, kwargs: Any = None, task_id: str | None = None,
                    producer: Any = None, link: Any = None, link_error: Any = None,
                    shadow: str | None = None, *, queue_key: keys.KeySpec = UNSET,
                    execution_key: keys.KeySpec = UNSET,
                    on_duplicate: keys.OnDuplicate | None = None,
                    queue_key_until: str | float | None = None,
                    execution_limit: int | None = None, rate: Any = UNSET,
                    rate_key: keys.KeySpec = UNSET, **options: Any) -> Any:
        """Celery's ``apply_async``, with roger's per-call options (keyword-only, typed)."""
        app = self._get_app()
        if app.conf.task_always_eager:
            # Eager jobs run inline: keys are validated, but no roger state is touched.
            self.roger_keys(tuple(args or ()), dict(kwargs or {}),
                            queue_key=queue_key, execution_key=execution_key)
            self.roger_rate(tuple(args or ()), dict(kwargs or {}), rate_key=rate_key, rate=rate)
        else:
            if queue_key is not UNSET:
                options["queue_key"] = queue_key
            if execution_key is not UNSET:
                options["execution_key"] = execution_key
            if on_duplicate is not None:
                options["on_duplicate"] = on_duplicate
            if queue_key_until is not None:
                options["queue_key_until"] = queue_key_until
            if execution_limit is not None:
                options["execution_limit"] = execution_limit
            if rate is not UNSET:
                options["rate"] = rate
            if rate_key is not UNSET:
                options["rate_key"] = rate_key
        return super().apply_async(args, kwargs, task_id, producer, link, link_error, shadow,
                                   **options)

