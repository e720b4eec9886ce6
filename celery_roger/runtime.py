"""Per-app roger runtime: its settings and store, and ``install(app)``."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from celery import Celery

from .callbacks import Callbacks, resolve
from .config import Settings
from .store import Store

if TYPE_CHECKING:
    from collections.abc import Callable

_lock = threading.RLock()


class Runtime:
    """Roger's state for one Celery app: settings (read once) and the Redis store."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self._settings: Settings | None = None
        self._store: Store | None = None
        self._callbacks: Callbacks | None = None
        self.original_send_task: Callable | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = Settings.from_app(self.app)
        return self._settings

    @property
    def store(self) -> Store:
        if self._store is None:
            with _lock:
                if self._store is None:
                    self._store = Store(self.settings)
        return self._store


    @property
    def callbacks(self) -> Callbacks:
        """The ``roger_callbacks`` objects, imported on first use."""
        if self._callbacks is None:
            self._callbacks = Callbacks(self.settings.partition, resolve(self.settings.callbacks))
        return self._callbacks


def runtime(app: Celery) -> Runtime:
    """The app's roger runtime, created on first use."""
    rt = app.__dict__.get("_roger_runtime")
    if rt is None:
        with _lock:
            rt = app.__dict__.get("_roger_runtime")
            if rt is None:
                rt = app.__dict__["_roger_runtime"] = Runtime(app)
    return rt


def install(app: Celery) -> Celery:
    """Make ``app`` roger-aware: per-call keys on ``send_task``, and the worker parts.

    Binding a ``RogerTask`` to an app does this; call it yourself in a process that only
    publishes tasks by name. Idempotent; returns the app.
    """
    from . import publish, worker

    rt = runtime(app)
    with _lock:
        if rt.original_send_task is None:
            rt.original_send_task = app.send_task
            app.send_task = publish.roger_send_task(app, rt.original_send_task)
            worker.install_worker_parts(app)
    return app
