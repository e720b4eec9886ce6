"""Per-app roger state (settings, store, callbacks), and this process's healers.

A leaf: everything imports it, it imports only the Redis layer and the settings."""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any

from celery import Celery

from .callbacks import Callbacks, resolve
from .config import Settings, as_written
from .fuse import Fuse
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
        self._fuse: Fuse | None = None
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
    def fuse(self) -> Fuse:
        """Fused publish (fuse.py): whether this app's broker allows it, and its token."""
        if self._fuse is None:
            with _lock:
                if self._fuse is None:
                    self._fuse = Fuse(self.app, self.store)
        return self._fuse

    @property
    def callbacks(self) -> Callbacks:
        """The ``roger_callbacks`` objects, imported on first use."""
        if self._callbacks is None:
            with as_written(self.app):
                objects = resolve(self.settings.callbacks)
            self._callbacks = Callbacks(self.settings.partition, objects)
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


# -- this process's healers (healer.py's Healer, one per app in a worker's main process) --

_healers: list[Any] = []


def register_healer(healer: Any) -> None:
    _healers.append(healer)


def healers() -> list[Any]:
    return list(_healers)


def pop_healer() -> Any:
    """The last registered healer, removed (at worker shutdown), or None."""
    return _healers.pop() if _healers else None


def healer_of(app: Celery) -> Any:
    """The app's healer in this process, or None (a pool process inherits the list, not
    the threads: it has none)."""
    for healer in _healers:
        if healer.app is app and healer.pid == os.getpid():
            return healer
    return None


def wake_healers(seconds: float) -> None:
    """A retry is due in ``seconds``: have this process's healing threads tick then."""
    for healer in list(_healers):
        healer.wake_in(seconds)
