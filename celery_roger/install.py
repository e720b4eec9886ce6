"""The one place that wires roger into a Celery app."""

from __future__ import annotations

import threading

from celery import Celery

from . import control, receivers  # noqa: F401 (their commands and receivers register on import)
from .consumer import install_worker_parts
from .publish import roger_send_task
from .runtime import runtime

_lock = threading.Lock()


def install(app: Celery) -> Celery:
    """Make ``app`` roger-aware: per-call keys on ``send_task``, and the worker parts.

    Binding a ``RogerTask`` to an app does this; call it yourself in a process that only
    publishes tasks by name. Idempotent; returns the app.
    """
    rt = runtime(app)
    with _lock:
        if rt.original_send_task is None:
            rt.original_send_task = app.send_task
            app.send_task = roger_send_task(app, rt.original_send_task)
            install_worker_parts(app)
    return app
