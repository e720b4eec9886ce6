"""A guard around a redis-py defect that deadlocks a freshly forked pool process.

A redis-py connection pool notices a fork in ``_checkpid`` and resets itself, under its
``_lock`` (redis-py 8). That lock is inherited from the parent process: if one of the
parent's threads held it at the fork (roger's lease, healing, publishing and callback
threads use Redis in the worker's main process, and so may a user's callbacks), the
child waits for it for ever, and its first job never starts. Celery's prefork pool forks
a new process whenever one ends (a crash, ``max_tasks_per_child``).

The guard gives a pool found in a new process fresh locks before redis-py's own check
runs: in that process only one thread exists at that point, so nobody else can hold them.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Any


def guard_fork() -> None:
    """Install the guard on redis-py's connection pools, once per process."""
    from redis import connection

    pool = connection.ConnectionPool
    if getattr(pool, "roger_fork_guarded", False):
        return
    original = pool._checkpid

    @functools.wraps(original)
    def _checkpid(self: Any) -> None:
        if self.pid != os.getpid():
            self._fork_lock = threading.RLock()
            self._lock = threading.RLock()
        original(self)

    pool._checkpid = _checkpid  # type: ignore[method-assign]
    pool.roger_fork_guarded = True  # type: ignore[attr-defined]
