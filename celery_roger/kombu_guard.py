"""Guards around kombu defects that stop a worker on a Redis broker.

``guard_redis_transport()`` installs both (idempotent):

* a queue entry that is not a kombu message (``_guard_foreign_entries``, below);
* the Redis broker restarts (``_guard_restore``):

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
import logging
from typing import Any

logger = logging.getLogger("celery_roger")


def guard_redis_transport() -> None:
    """Install the guards on kombu's Redis transport, once per process."""
    try:
        from kombu.transport import redis as transport
    except ImportError:  # pragma: no cover - redis-py is a dependency
        return
    if getattr(transport, "roger_guarded", False):
        return
    _guard_restore(transport)
    _guard_foreign_entries(transport)
    transport.roger_guarded = True  # type: ignore[attr-defined]


def _guard_restore(transport: Any) -> None:
    original = transport.Channel._get_pool

    @functools.wraps(original)
    def _get_pool(self: Any, asynchronous: bool = False) -> Any:
        if getattr(self.connection, "client", None) is None:
            raise transport.redis.exceptions.ConnectionError(
                "this broker connection is closed; its unacknowledged messages are "
                "delivered again after the visibility timeout"
            )
        return original(self, asynchronous)

    setattr(transport.Channel, "_get_pool", _get_pool)  # noqa: B010 - a method, on purpose


class NotAMessage(ValueError):
    """An entry of a Redis broker queue that is not a kombu message."""


def _guard_foreign_entries(transport: Any) -> None:
    """Keep the worker running when a queue holds an entry that is not a kombu message.

    kombu's Redis transport stops the worker ("Unrecoverable error") on a queue entry that
    is not JSON, or is JSON without a kombu message's fields: something another program
    pushed into the queue's list. With this guard such an entry is logged (its first
    bytes) and discarded, and the worker goes on. Messages in kombu's format, even with a
    body that cannot be decoded or a task this worker does not know, are Celery's to
    handle (it logs and rejects them); the guard does not touch them.
    """
    original_read = transport.Channel._brpop_read
    original_loads = transport.loads

    def loads(raw: Any) -> Any:
        try:
            return original_loads(raw)
        except ValueError as exc:
            raise NotAMessage(f"not JSON ({exc}): {_preview(raw)}") from exc

    base: Any = transport.Channel.Message

    class Message(base):
        def __init__(self, payload: Any, channel: Any = None, **kwargs: Any) -> None:
            try:
                super().__init__(payload, channel=channel, **kwargs)
                if not {"exchange", "routing_key"} <= set(self.delivery_info or ()):
                    raise ValueError("its delivery_info lacks exchange or routing_key")
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise NotAMessage(f"not a kombu message ({type(exc).__name__}: {exc}): "
                                  f"{_preview(payload)}") from exc

    @functools.wraps(original_read)
    def _brpop_read(self: Any, **options: Any) -> Any:
        try:
            return original_read(self, **options)
        except NotAMessage as exc:
            logger.error("Discarded an entry of a broker queue that is %s", exc)
            return True

    setattr(transport, "loads", loads)  # noqa: B010 - the transport's own name for it
    transport.Channel.Message = Message
    setattr(transport.Channel, "_brpop_read", _brpop_read)  # noqa: B010 - a method, on purpose


def _preview(raw: Any) -> str:
    text = repr(raw)
    return text if len(text) <= 200 else text[:200] + "..."
