"""A guard around one kombu defect that stops a worker when its Redis broker restarts.

When the Redis broker goes away while the worker holds unacknowledged messages (late ack,
roger's default), Celery closes the broken connection. kombu's Redis channel of that
connection is then still used, to restore those messages or to acknowledge a job that
finishes just after, and it builds a new connection pool from a transport that is already
torn down: ``AttributeError: 'NoneType' object has no attribute 'hostname'`` escapes and
the worker exits with "Unrecoverable error" instead of reconnecting (kombu 5.5 to 5.7).

The guard turns that case into a Redis connection error, which kombu's close and ack paths
already handle (ignored or logged). The messages stay in the broker's ``unacked`` hash and
the transport's visibility timeout delivers them again, as for a worker that died: none is
lost, and a job that had finished may run again (at least once, as in Roger).
"""

from __future__ import annotations

import functools
from typing import Any


def guard_redis_restore() -> None:
    """Install the guard on kombu's Redis transport (idempotent)."""
    try:
        from kombu.transport import redis as transport
    except ImportError:  # pragma: no cover - redis-py is a dependency
        return
    original = transport.Channel._get_pool
    if getattr(original, "roger_guarded", False):
        return

    @functools.wraps(original)
    def _get_pool(self: Any, asynchronous: bool = False) -> Any:
        if getattr(self.connection, "client", None) is None:
            raise transport.redis.exceptions.ConnectionError(
                "this broker connection is closed; its unacknowledged messages are "
                "delivered again after the visibility timeout"
            )
        return original(self, asynchronous)

    _get_pool.roger_guarded = True  # type: ignore[attr-defined]
    setattr(transport.Channel, "_get_pool", _get_pool)  # noqa: B010 - a method, on purpose
