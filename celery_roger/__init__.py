"""Roger's job semantics for Celery.

Add ``base=RogerTask`` to a task to give it queue keys (dedup at publish) and execution
keys (one job per key at a time, cluster-wide, the others parked in FIFO order).
"""

from .api import Roger
from .errors import ConfigurationError, DuplicateJob, RogerError
from .runtime import install
from .task import RogerTask

__all__ = ["ConfigurationError", "DuplicateJob", "Roger", "RogerError", "RogerTask", "install"]
__version__ = "0.1.0"
