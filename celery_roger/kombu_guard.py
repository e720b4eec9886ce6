"""Guards around kombu defects that stop a worker on a Redis broker, and a way to see
where a publish went.

``guard_redis_transport()`` installs them (idempotent):

* ``delivery()`` (below): which queues a publish reached on a Redis broker, where a
  message routed to no queue is dropped silently;
* ``intercept()`` (below): a hook on the Redis channel's ``basic_publish``, where the
  final message and its list are known (fuse.py runs its fused publish there), and
  ``after_flush()``: work to do once a kombu publish batch is flushed;

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

import contextlib
import contextvars
import functools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
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
    _track_delivery(transport)
    _track_batches(transport)
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


@dataclass
class Delivery:
    """What a publish did on a Redis broker: ``routed`` is false when the broker found no
    queue for it (and dropped it); ``redis`` is false on another broker (nothing known)."""

    redis: bool = False
    queues: list[str] = field(default_factory=list)

    @property
    def unroutable(self) -> bool:
        return self.redis and not self.queues


_DELIVERY: contextvars.ContextVar[Delivery | None] = contextvars.ContextVar(
    "roger_delivery", default=None)

#: ``interceptor(channel, original, message, exchange, routing_key, kwargs)``: publishes
#: in place of the Redis channel's ``basic_publish`` within ``intercept()``.
Interceptor = Callable[[Any, Callable[..., Any], dict, str, str, dict[str, Any]], Any]
_INTERCEPTOR: contextvars.ContextVar[Interceptor | None] = contextvars.ContextVar(
    "roger_interceptor", default=None)


class intercept:
    """Within this block (this thread), the Redis channel's publishes go through
    ``interceptor``, which calls ``original`` for what it does not take over; ``seen``
    records where they went, as ``delivery()`` does. A class, not a generator: it is on
    the publish path."""

    def __init__(self, interceptor: Interceptor, seen: Delivery) -> None:
        self.interceptor, self.seen = interceptor, seen

    def __enter__(self) -> Delivery:
        self._tokens = (_INTERCEPTOR.set(self.interceptor), _DELIVERY.set(self.seen))
        return self.seen

    def __exit__(self, *exc: object) -> None:
        _INTERCEPTOR.reset(self._tokens[0])
        _DELIVERY.reset(self._tokens[1])


def record_delivery(queue: str) -> None:
    """An interceptor pushed a message to ``queue`` itself (for ``delivery()``)."""
    seen = _DELIVERY.get()
    if seen is not None:
        seen.redis = True
        seen.queues.append(queue)


def after_flush(batch: Any, work: Callable[[bool], None]) -> None:
    """Run ``work(True)`` once kombu's publish ``batch`` is flushed, ``work(False)`` if it
    is discarded or its flush fails (kombu 5.7's ``PublishBatch``)."""
    batch.__dict__.setdefault("roger_after_flush", []).append(work)


def _run_after_flush(batch: Any, flushed: bool) -> None:
    for work in batch.__dict__.pop("roger_after_flush", []):
        try:
            work(flushed)
        except Exception:
            logger.exception("roger: the work after a kombu publish batch failed")


def _track_batches(transport: Any) -> None:
    batch_cls = getattr(transport, "PublishBatch", None)
    if batch_cls is None:  # kombu < 5.7: no publish batches
        return
    original_flush, original_discard = batch_cls.flush, batch_cls.discard

    @functools.wraps(original_flush)
    def flush(self: Any) -> Any:
        try:
            result = original_flush(self)
        except BaseException:
            _run_after_flush(self, False)
            raise
        _run_after_flush(self, True)
        return result

    @functools.wraps(original_discard)
    def discard(self: Any) -> Any:
        _run_after_flush(self, False)
        return original_discard(self)

    setattr(batch_cls, "flush", flush)  # noqa: B010 - a method, on purpose
    setattr(batch_cls, "discard", discard)  # noqa: B010 - a method, on purpose


@contextlib.contextmanager
def delivery() -> Iterator[Delivery]:
    """Record where the publishes made in this block (this thread) went."""
    seen = Delivery()
    token = _DELIVERY.set(seen)
    try:
        yield seen
    finally:
        _DELIVERY.reset(token)


def _track_delivery(transport: Any) -> None:
    original_publish = transport.Channel.basic_publish
    original_put = transport.Channel._put
    original_fanout = transport.Channel._put_fanout

    @functools.wraps(original_publish)
    def basic_publish(self: Any, message: Any, exchange: Any, routing_key: Any,
                      **kwargs: Any) -> Any:
        seen = _DELIVERY.get()
        if seen is not None:
            seen.redis = True
        interceptor = _INTERCEPTOR.get()
        if interceptor is not None:
            return interceptor(self, original_publish, message, exchange, routing_key, kwargs)
        return original_publish(self, message, exchange, routing_key, **kwargs)

    @functools.wraps(original_put)
    def _put(self: Any, queue: Any, *args: Any, **kwargs: Any) -> Any:
        seen = _DELIVERY.get()
        if seen is not None:
            seen.queues.append(str(queue))
        return original_put(self, queue, *args, **kwargs)

    @functools.wraps(original_fanout)
    def _put_fanout(self: Any, exchange: Any, *args: Any, **kwargs: Any) -> Any:
        seen = _DELIVERY.get()
        if seen is not None:
            seen.queues.append(f"fanout:{exchange}")
        return original_fanout(self, exchange, *args, **kwargs)

    setattr(transport.Channel, "basic_publish", basic_publish)  # noqa: B010 - a method
    setattr(transport.Channel, "_put", _put)  # noqa: B010 - a method, on purpose
    setattr(transport.Channel, "_put_fanout", _put_fanout)  # noqa: B010 - a method
