"""Roger's lifecycle callbacks (``roger_callbacks``) and their signals.

``roger_callbacks`` names one or more objects (a dotted path, an object, or a list of
either; a class is instantiated once). Each may define any of::

    before_run(partition, job)                         -> state
    after_run(partition, job, result, state)
    on_error(partition, job, error, traceback, state)
    on_cancel(partition, job)
    on_buried(partition, job, error, traceback, state)

``state`` is what that same object's ``before_run`` returned for this attempt (None for
timeouts and crashes, whose callbacks run in the worker's main process). Signal
receivers get the first callback object's state. A callback that raises is logged with
the job id; it never changes the job's outcome.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from typing import Any

from . import signals
from .config import import_setting
from .errors import ConfigurationError
from .job import Job

logger = logging.getLogger("celery_roger")

NAMES = ("before_run", "after_run", "on_error", "on_cancel", "on_buried")


def resolve(setting: Any) -> tuple[Any, ...]:
    """The callback objects named by ``roger_callbacks``."""
    if setting is None:
        return ()
    items = setting if isinstance(setting, Sequence) and not isinstance(setting, str) \
        else [setting]
    objects = []
    for item in items:
        obj = item
        if isinstance(item, str):
            obj = import_setting("roger_callbacks", item)
        if inspect.isclass(obj):
            obj = obj()
        if not any(callable(getattr(obj, name, None)) for name in NAMES):
            raise ConfigurationError(
                f"setting roger_callbacks: {item!r} defines none of {', '.join(NAMES)}"
            )
        objects.append(obj)
    return tuple(objects)


class Callbacks:
    """Calls the configured callback objects, then the signal of the same name."""

    def __init__(self, partition: str, objects: tuple[Any, ...]) -> None:
        self.partition = partition
        self.objects = objects

    def before_run(self, sender: Any, job: Job) -> list[Any]:
        """Run ``before_run`` everywhere; returns each object's state, in order."""
        states = [self._call(obj, "before_run", job) for obj in self.objects]
        self._send(sender, "before_run", job)
        return states

    def emit(self, sender: Any, name: str, job: Job, states: Sequence[Any] | None = None,
             **values: Any) -> None:
        """Run callback ``name`` (not before_run) on every object, then its signal."""
        with_state = name != "on_cancel"
        for i, obj in enumerate(self.objects):
            extra = dict(values)
            if with_state:
                extra["state"] = states[i] if states and i < len(states) else None
            self._call(obj, name, job, **extra)
        if with_state:
            values["state"] = states[0] if states else None
        self._send(sender, name, job, **values)

    def _call(self, obj: Any, name: str, job: Job, **values: Any) -> Any:
        fn = getattr(obj, name, None)
        if not callable(fn):
            return None
        try:
            return fn(self.partition, job, *values.values())
        except BaseException:  # SystemExit too: a callback never ends the thread it runs on
            logger.exception("roger callback %s.%s raised for job %s[%s]; ignored",
                             type(obj).__name__, name, job.task, job.id)
            return None

    def _send(self, sender: Any, name: str, job: Job, **values: Any) -> None:
        signal = getattr(signals, name)
        if not signal.receivers:
            return
        for receiver, response in signal.send(sender=sender, partition=self.partition, job=job,
                                              **values):
            if isinstance(response, Exception):
                logger.error("roger signal %s receiver %r raised for job %s[%s]: %r; ignored",
                             name, receiver, job.task, job.id, response)
