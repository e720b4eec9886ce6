"""Exceptions users see."""

from __future__ import annotations


class RogerError(Exception):
    """Base class of celery_roger's own errors."""


class ConfigurationError(RogerError, ValueError):
    """A ``roger_*`` setting has a value of the wrong type or range."""


class DuplicateJob(RogerError):
    """A job with the same queue key is already queued, parked or running.

    ``queue_key`` is the contested key, ``existing_id`` the id of the job that holds it.
    """

    def __init__(self, queue_key: str, existing_id: str, task_name: str = "") -> None:
        self.queue_key = queue_key
        self.existing_id = existing_id
        self.task_name = task_name
        what = f"{task_name}: " if task_name else ""
        super().__init__(
            f"{what}queue key {queue_key!r} is held by job {existing_id}; nothing was published"
        )

    def __reduce__(self):  # keep the attributes across pickling (result backends, pools)
        return (type(self), (self.queue_key, self.existing_id, self.task_name))
