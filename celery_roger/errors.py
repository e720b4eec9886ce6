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
        # The arguments are the exception's args, so that a result backend that stores
        # an exception as its type and args (JSON) rebuilds it with its attributes.
        super().__init__(queue_key, existing_id, task_name)
        self.queue_key = queue_key
        self.existing_id = existing_id
        self.task_name = task_name

    def __str__(self) -> str:
        what = f"{self.task_name}: " if self.task_name else ""
        return (f"{what}queue key {self.queue_key!r} is held by job {self.existing_id}; "
                "nothing was published")

    def __reduce__(self):  # keep the attributes across pickling (result backends, pools)
        return (type(self), (self.queue_key, self.existing_id, self.task_name))


class RetryableError(RogerError):
    """Raise from a RogerTask to ask for a retry, after ``retry_after`` seconds if given.

    It counts as a step of the retry sequence (the job is buried once the sequence is
    exhausted), and it works whether or not the task is ``retryable``.
    """

    def __init__(self, message: str = "", retry_after: float | None = None) -> None:
        if retry_after is not None and (
            isinstance(retry_after, bool) or not isinstance(retry_after, (int, float))
            or retry_after < 0
        ):
            raise ValueError(f"retry_after must be a number of seconds >= 0, got {retry_after!r}")
        self.retry_after = retry_after
        super().__init__(message or "retry requested")

    def __reduce__(self):
        return (type(self), (str(self), self.retry_after))


class JobTimeout(RogerError):
    """The job ran longer than its ``max_execution_time`` and was stopped."""


class WorkerCrashed(RogerError):
    """The process running the job died (SIGKILL, OOM, a crash) before the job ended."""


class JobAborted(RogerError):
    """The job raised a ``BaseException`` that is not an ``Exception`` (``asyncio``'s
    ``CancelledError``, a library's own): roger handles it as a failure (retry, burial or
    ``FAILURE``), and Celery stores this error in its place. Its message is the original's
    ``"Type: message"``; the original is its ``__cause__`` (and is what ``on_error`` and
    ``on_buried`` receive)."""


class WrongPartition(RogerError):
    """A worker of one roger partition received a job published in another: it refuses
    it (``FAILURE``; the job's keys are released in the job's own partition)."""

    def __init__(self, job_partition: str, worker_partition: str, task_name: str = "") -> None:
        super().__init__(job_partition, worker_partition, task_name)
        self.job_partition = job_partition
        self.worker_partition = worker_partition
        self.task_name = task_name

    def __str__(self) -> str:
        what = f"{self.task_name}: " if self.task_name else ""
        return (f"{what}published in roger partition {self.job_partition!r}, refused by "
                f"a worker of partition {self.worker_partition!r}")

    def __reduce__(self):
        return (type(self), (self.job_partition, self.worker_partition, self.task_name))


class OlderWorkersRunning(RogerError):
    """Workers of an earlier celery-roger, which keep state under older key names, hold
    live leases: a worker of this version admits nothing beside them."""

    def __init__(self, instances: list[str]) -> None:
        self.instances = instances
        super().__init__(
            f"workers of an earlier celery-roger are running ({', '.join(instances)}): stop "
            "them, then start this worker; it moves their state to this version's key names "
            "(see the README, Upgrading)")
