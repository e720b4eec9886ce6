"""Roger's job semantics for Celery.

Add ``base=RogerTask`` to a task to give it queue keys (dedup at publish) and execution
keys (one job per key at a time, cluster-wide, the others parked in FIFO order),
Roger's retry sequence ending in a buried queue, and Roger's lifecycle callbacks.
"""

from .api import Roger
from .errors import (
    ConfigurationError,
    DuplicateJob,
    JobTimeout,
    RetryableError,
    RogerError,
    WorkerCrashed,
)
from .install import install
from .job import BuriedJob, Job
from .task import RogerTask

__all__ = [
    "BuriedJob", "ConfigurationError", "DuplicateJob", "Job", "JobTimeout", "RetryableError",
    "Roger", "RogerError", "RogerTask", "WorkerCrashed", "install",
]
__version__ = "0.1.0"
