"""Roger's receivers of Celery's signals: an attempt's end in the job's process
(``task_postrun``), revokes, refused and unknown messages, and the worker's and pool's
start. Each returns at once for anything that is not a roger job."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
from typing import Any

from celery import signals
from redis.exceptions import RedisError

from . import events
from .deferred import DEFERRED
from .job import Job, is_roger_task, job_header, job_keys
from .lease import POOL_SLOTS, JobGuard, in_pool_process, pool_index
from .lifecycle import finish_quietly
from .runtime import healer_of, runtime

logger = logging.getLogger("celery_roger")

#: The JobGuard of each app in this pool process.
_guards: dict[int, JobGuard] = {}
#: This process's index in its prefork pool (None elsewhere), read at its start.
_index: list[int | None] = [None]


@signals.task_prerun.connect(weak=False, dispatch_uid="celery_roger.pool_slot_running")
def _slot_running(task_id: str = "", **_: Any) -> None:
    """Any job (roger's or not) a pool process starts is written to its slot, so a kill
    meant for the job it ran before never hits it (lease.PoolSlots)."""
    if _index[0] is not None and isinstance(task_id, str):
        POOL_SLOTS.running(_index[0], task_id)


@signals.task_postrun.connect(weak=False, dispatch_uid="celery_roger.pool_slot_idle")
def _slot_idle(**_: Any) -> None:
    if _index[0] is not None:
        POOL_SLOTS.idle(_index[0])


@signals.task_prerun.connect(weak=False, dispatch_uid="celery_roger.task_prerun")
def _guard_attempt(sender: Any = None, task_id: str = "", **_: Any) -> None:
    """A keyed job in a prefork pool process runs under its worker's lease (JobGuard)."""
    if not is_roger_task(sender) or sender.request.is_eager:
        return
    instance = getattr(sender.request, "roger_instance", None)
    if not instance or not job_keys(sender.request)[0] or not in_pool_process():
        return
    guard = _guards.get(id(sender.app))
    if guard is None:
        guard = _guards[id(sender.app)] = JobGuard(runtime(sender.app).store)
    guard.watch(task_id, instance)


@signals.task_postrun.connect(weak=False, dispatch_uid="celery_roger.task_postrun")
def _attempt_ended(sender: Any = None, task_id: str = "", retval: Any = None,
                   state: str = "", **_: Any) -> None:
    """The attempt ended in the job's process, its result stored: release the keys
    (promoting the next parked job), then run after_run / on_error / on_buried."""
    if not is_roger_task(sender) or sender.request.is_eager:
        return
    guard = _guards.get(id(sender.app))
    if guard is not None:
        guard.done()
    sender.roger_end_attempt(task_id, retval, state)


@signals.task_revoked.connect(weak=False, dispatch_uid="celery_roger.task_revoked")
def _revoked(sender: Any = None, request: Any = None, **_: Any) -> None:
    """Celery revoked the job (revoke, terminate, expires): free what it holds."""
    if not is_roger_task(sender) or request is None:
        return
    ek, qk = job_keys(request)
    finish_quietly(sender.app, request.id, ek, qk,
                   instance=(getattr(request, "request_dict", None) or {}).get("roger_instance"))
    try:
        report = runtime(sender.app).store.claim_cancel(request.id)
    except RedisError as exc:
        logger.warning("could not record the revoke of %s: %s", request.id, exc)
        return
    if report:
        healer = healer_of(sender.app)
        admission = None if healer is None else healer.admission
        job = Job.from_request(request, started_at=_started_at(request))
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
        finish_quietly(app, headers["id"], ek, qk)
    return True


@signals.worker_init.connect(weak=False, dispatch_uid="celery_roger.worker_init")
def _events_on(sender: Any = None, **_: Any) -> None:
    """``celery worker -E``: roger's task events are on in this worker and its pool, sent
    under this worker's name (its pool processes inherit it)."""
    app = getattr(sender, "app", None)
    if app is None:
        return
    if getattr(sender, "task_events", False):
        app.conf.worker_send_task_events = True
    hostname = getattr(sender, "hostname", None)
    if isinstance(hostname, str) and hostname:
        events.set_worker(app, hostname)


@signals.worker_process_init.connect(weak=False, dispatch_uid="celery_roger.process_init")
def _die_with_parent(**_: Any) -> None:
    """A pool process must not outlive its worker: its keys are freed when the worker dies.
    It also learns its pool index, for its slot (lease.PoolSlots)."""
    _index[0] = pool_index()
    if os.uname().sysname == "Linux":
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            logger.debug("prctl(PR_SET_PDEATHSIG) unavailable")


@signals.worker_process_shutdown.connect(weak=False, dispatch_uid="celery_roger.process_exit")
def _flush_ended(**_: Any) -> None:
    """A pool process that exits (max_tasks_per_child, a warm shutdown) first forgets its
    last job without keys as running (deferred.py)."""
    DEFERRED.flush()


def _started_at(request: Any) -> float:
    """When the pool accepted a revoked job (0: never, or not known from ``request``)."""
    watch = getattr(request, "roger_watch", None)
    return float(getattr(watch, "started_at", 0.0) or 0.0)
