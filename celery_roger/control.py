"""Roger's remote-control commands, which reach every worker at once (``roger_pause``,
``roger_resume``, ``roger_cancel``, the ``roger`` inspect command), and Celery's own
``revoke`` wrapped so it also cancels in roger state. Imported by ``install``."""

from __future__ import annotations

import logging
import signal
from typing import Any

from celery import Celery
from celery.worker import state as worker_state
from celery.worker.control import Panel, control_command, inspect_command
from redis.exceptions import RedisError

from .admission import Admission
from .job import is_roger_task, job_header, job_keys
from .runtime import runtime

logger = logging.getLogger("celery_roger")


def _admission(state: Any) -> Admission | None:
    handler = getattr(state.consumer, "on_task_request", None)
    return handler if isinstance(handler, Admission) else None


def _change(state: Any, queue: str, paused: bool) -> dict[str, Any]:
    admission = _admission(state)
    if admission is None:
        return {"ok": "not a roger worker"}
    admission.queues.change(queue, paused)
    return {"ok": f"queue {queue} {'paused' if paused else 'resumed'}"}


@control_command(args=[("queue", str)], signature="<queue>")
def roger_pause(state: Any, queue: str, **kwargs: Any) -> dict[str, Any]:
    """Stop consuming ``queue`` if this worker consumes it (roger's pause)."""
    return _change(state, queue, True)


@control_command(args=[("queue", str)], signature="<queue>")
def roger_resume(state: Any, queue: str, **kwargs: Any) -> dict[str, Any]:
    """Consume ``queue`` again if this worker consumed it before it was paused."""
    return _change(state, queue, False)


@control_command(args=[("job_ids", list)], signature="<job_id> [job_id ...]")
def roger_cancel(state: Any, job_ids: list[str], **kwargs: Any) -> dict[str, Any]:
    """Drop delivered copies of the jobs and kill the ones running here (prefork)."""
    ids = {str(j) for j in job_ids}
    worker_state.revoked.update(ids)  # Celery drops copies delivered later (task_revoked)
    killed, cooperative = [], []
    admission = _admission(state)
    for job_id in ids:
        waiting = admission.admitted.get(job_id) if admission is not None else None
        if waiting is not None and not waiting.roger_watch.started:
            # Admitted, waiting for a pool slot: its start check drops it, or, if it
            # starts too soon after admission to check, it is killed as it starts.
            waiting.roger_watch.cancel_on_start = True
    for request in list(worker_state.active_requests):
        if request.id not in ids or not is_roger_task(request.task):
            continue
        if not request.time_start:
            request.roger_watch.cancel_on_start = True
            continue
        if not _attempt_running(state.consumer.app, request.id):
            continue  # its attempt ended (result stored); only the ack is pending here
        try:
            request.terminate(state.consumer.pool, signal=signal.SIGKILL)
            killed.append(request.id)
        except NotImplementedError:
            cooperative.append(request.id)
            logger.warning("Job %s is cancelled but the %s pool cannot stop it: it is "
                           "reported cancelled when it returns (self.is_cancelled() is true)",
                           request.id, type(state.consumer.pool).__name__)
    return {"ok": {"killed": killed, "cannot_kill": cooperative}}


def _attempt_running(app: Celery, job_id: str) -> bool:
    """Whether the job's attempt is still recorded as running (it is until its end)."""
    store = runtime(app).store
    try:
        return bool(store.redis.hexists(store.k_running, job_id))
    except RedisError:
        return True  # cannot tell: stopping it is the safe side of a cancel


def _wrap_celery_revoke() -> None:
    """Celery's own revoke (AsyncResult.revoke, Flower) also cancels in roger state."""
    entry = Panel.data.get("revoke")
    if entry is None or getattr(entry, "_roger", False):
        return

    def revoke(state: Any, task_id: Any, terminate: bool = False, signal: Any = None,
               **kwargs: Any) -> Any:
        reply = entry(state, task_id, terminate=terminate, signal=signal, **kwargs)
        admission = _admission(state)
        if admission is not None:
            ids = [task_id] if isinstance(task_id, str) else list(task_id or ())
            admission.revoked_ids.extend(str(i) for i in ids)
            admission.wakeup.set()
        return reply

    revoke._roger = True  # type: ignore[attr-defined]
    revoke.__doc__ = entry.__doc__
    Panel.data["revoke"] = revoke


_wrap_celery_revoke()


@inspect_command()
def roger(state: Any, **kwargs: Any) -> dict[str, Any]:
    """This worker's roger view: running roger jobs, keys they hold, paused queues applied."""
    admission = _admission(state)
    if admission is None:
        return {"error": "not a roger worker"}
    jobs, execution_keys, queue_keys = [], [], []
    for request in list(worker_state.active_requests):
        if not is_roger_task(request.task):
            continue
        header = job_header(request.request_dict)
        ek, qk = job_keys(request.request_dict)
        jobs.append({"id": request.id, "task": request.name, "queue": header.get("q"),
                     "pid": request.worker_pid, "started": request.time_start,
                     "queue_key": qk or None, "execution_key": ek or None})
        if ek:
            execution_keys.append(ek)
        if qk:
            queue_keys.append(qk)
    waiting = [r.id for r in admission.admitted.values() if not r.roger_watch.started]
    queues = admission.queues
    return {
        "instance": admission.instance,
        "running": jobs,
        "admitted_waiting_for_slot": waiting,
        "execution_keys": sorted(execution_keys),
        "queue_keys": sorted(queue_keys),
        "paused_applied": sorted(queues.applied or ()),
        "not_consuming_because_paused": sorted(queues.paused_here),
        "consumed_at_start": sorted(queues.original or ()),
    }
