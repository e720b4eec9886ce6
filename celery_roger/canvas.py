"""Roger jobs in Celery's canvas: chains, groups, chords and links.

A job published as part of a canvas has dependents that wait on its own id: the rest of
its chain, its chord's callback, the ``GroupResult`` or chain result its caller holds. If
its queue key is held, the job holding the key cannot stand in for it, and raising
``DuplicateJob`` would break the canvas half-way: a group half published, or, when the
worker publishes a finished task's links, that task turned into FAILURE. So such a job is
refused as a failure: it is not published, and its id is stored as FAILURE with the
``DuplicateJob``, which Celery carries on as for any failed task (the rest of its chain
fails, its chord's callback gets ``ChordError``, its ``link_error`` callbacks run).
"""

from __future__ import annotations

import logging
import os
import sys
from types import CodeType, FrameType
from typing import Any

import celery
from celery import Celery
from celery.app.task import Context
from celery.utils.functional import maybe_list

from .errors import DuplicateJob

logger = logging.getLogger("celery_roger")

_CELERY_DIR = os.path.dirname(celery.__file__)
_TRACE_FILE = os.path.join(_CELERY_DIR, "app", "trace.py")
# Where the trace publishes a finished task's links and chain (inline in the canvas
# before Celery 5.7), and where a result backend publishes a chord's callback.
_DISPATCH = ("_dispatch_callbacks_and_chain",)
_DISPATCH_FILES = (os.path.join(_CELERY_DIR, "canvas.py"),
                   os.path.join(_CELERY_DIR, "backends") + os.sep)


def in_canvas(options: dict[str, Any]) -> bool:
    """Whether a job is published with dependents waiting on its own id."""
    return bool(options.get("chain") or options.get("chord") or options.get("group_id")) \
        or published_by_trace()


def published_by_trace() -> bool:
    """Whether the worker publishes this job after a task returned: one of that task's
    links, the next step of its chain, or its chord's callback (not the task's own code).
    """
    frame: FrameType | None = sys._getframe(1)
    callee: CodeType | None = None
    while frame is not None:
        code = frame.f_code
        if code.co_name == "trace_task" and code.co_filename == _TRACE_FILE:
            # The frame it called is the task's body (the task's own code, or a wrapper
            # of it such as autoretry's), or one of the dispatchers above.
            return callee is not None and (callee.co_name in _DISPATCH
                                           or callee.co_filename.startswith(_DISPATCH_FILES))
        callee, frame = code, frame.f_back
    return False


def refuse(app: Celery, task: Any, name: str, args: Any, kwargs: Any,
           options: dict[str, Any], error: DuplicateJob) -> Any:
    """Store a refused canvas job as FAILURE(DuplicateJob); returns its AsyncResult."""
    task_id = options["task_id"]
    logger.warning(
        "%s[%s] not published: queue key %r is held by job %s; stored as FAILURE "
        "(DuplicateJob), as the failure of this part of its chain, group or chord",
        name, task_id, error.queue_key, error.existing_id,
    )
    request = Context(
        id=task_id, task=name, args=list(args or ()), kwargs=dict(kwargs or {}),
        root_id=options.get("root_id"), parent_id=options.get("parent_id"),
        group=options.get("group_id"), group_index=options.get("group_index"),
        chord=options.get("chord"), chain=options.get("chain"),
        errbacks=maybe_list(options.get("link_error")), ignore_result=False,
    )
    backend = getattr(task, "backend", None) or app.backend
    backend.mark_as_failure(task_id, error, request=request)
    result_cls = options.get("result_cls") or getattr(task, "AsyncResult", app.AsyncResult)
    return result_cls(task_id)
