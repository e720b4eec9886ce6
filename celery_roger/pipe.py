"""Scripts sent from the worker's event loop without waiting for their replies.

Admission runs in the worker's main process, whose one thread also reads the broker,
acks and feeds the pool: a script call that waits for its reply stops all of that for a
Redis round trip, once per job with an execution key. ``ScriptPipe`` sends each call on
a connection of its own and lets the event loop (kombu's hub) read the replies when they
arrive, in the order the calls were sent, which is the order Redis ran them in: jobs are
still admitted in delivery order, and a key's parked line stays FIFO.

Each call names two callbacks: ``on_reply(reply)`` or ``on_error(exc)``. An error reply
(``NOSCRIPT`` after a Redis restart, an error raised by the script) fails that call only;
a broken connection fails every call in flight, and the next call connects again. A call
that failed this way may or may not have run in Redis: the caller's retry must be safe
either way (admission's is: admit.lua admits a job recorded as running here again).
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from typing import Any

import redis
from redis.exceptions import ConnectionError, RedisError, ResponseError, TimeoutError

logger = logging.getLogger("celery_roger")

#: When the loop closes, how long the replies already due are waited for.
CLOSE_DRAIN_SECONDS = 2.0
#: A call whose reply has not come in this long breaks the connection (as a socket
#: timeout would a waiting call); its caller tries again.
STALL_SECONDS = 5.0

OnReply = Callable[[Any], None]
OnError = Callable[[Exception], None]


class LoopClosed(RedisError):
    """The event loop was reset (the broker connection was lost): the calls in flight
    belong to messages the broker gives back, so their callers drop them."""


def can_pipe(client: Any) -> bool:
    """Whether ``client`` is a plain redis-py client whose connections the pipe can open
    itself (not a Sentinel's or a Cluster's: roger_redis_client)."""
    pool = getattr(client, "connection_pool", None)
    return type(client) is redis.Redis and type(pool) is redis.ConnectionPool


class ScriptPipe:
    """EVALSHA calls whose replies the event loop reads (``hub``: kombu's Hub)."""

    def __init__(self, client: redis.Redis, hub: Any, *, scripts: tuple[str, ...] = (),
                 before_close: Callable[[], None] | None = None) -> None:
        self.client = client
        self.hub = hub
        #: loaded on each new connection, so a call is refused NOSCRIPT only after a
        #: SCRIPT FLUSH (a restarted Redis breaks the connection first)
        self.scripts = scripts
        #: told first when the loop closes (the caller stops acting on replies as usual)
        self.before_close = before_close
        self._conn: Any = None
        self._fd: int | None = None
        self._waiting: collections.deque[tuple[OnReply, OnError, float]] = \
            collections.deque()
        hub.on_close.add(self._loop_closed)

    @property
    def in_flight(self) -> int:
        return len(self._waiting)

    def send(self, sha: str, keys: list[str], args: list[Any], on_reply: OnReply,
             on_error: OnError) -> None:
        """Send EVALSHA ``sha``; exactly one of the callbacks is called, later (or now,
        with the error, if it cannot be sent)."""
        try:
            conn = self._connection()
            conn.send_command("EVALSHA", sha, len(keys), *keys, *args)
        except RedisError as exc:
            self._broken(exc)
            on_error(exc)
            return
        self._waiting.append((on_reply, on_error, time.monotonic()))

    def drain(self, timeout: float = CLOSE_DRAIN_SECONDS) -> None:
        """Read the replies still due, waiting for them up to ``timeout`` in all; the
        calls still without a reply then stay in flight."""
        deadline = time.monotonic() + timeout
        while self._waiting and self._conn is not None:
            left = deadline - time.monotonic()
            try:
                if left <= 0 or not self._conn.can_read(timeout=left):
                    return
            except RedisError as exc:
                self._broken(exc)
                return
            self._read()

    def close(self) -> None:
        """The worker stops: the calls still in flight fail as closed (dropped)."""
        self._broken(LoopClosed("the worker is stopping"))

    def poll(self) -> None:
        """Read the replies that have arrived (the worker's watch, each second: a safety
        net should the loop not have called ``_readable``); a call stalled past
        STALL_SECONDS (Redis stopped) fails, with every call behind it."""
        if self._waiting and self._conn is not None:
            self._readable()
        if self._waiting and time.monotonic() - self._waiting[0][2] > STALL_SECONDS:
            self._broken(TimeoutError(f"Redis did not answer in {STALL_SECONDS:.0f}s"))

    def _loop_closed(self, _hub: Any) -> None:
        """The loop is reset (broker connection lost) or closed (the worker stops): the
        replies already due are read now (their caller was told, ``before_close``), the
        rest fail as closed."""
        if self.before_close is not None and self._waiting:
            try:
                self.before_close()
            except Exception:
                logger.exception("roger: preparing the script pipe's close failed")
        self._fd = None  # (the loop has forgotten its readers)
        self.drain(timeout=CLOSE_DRAIN_SECONDS)
        self._broken(LoopClosed("the worker's event loop was reset"))

    def _connection(self) -> Any:
        if self._conn is not None and (self._fd not in self.hub.readers
                                       or self._conn._sock is None):
            # the loop forgot its reader, or redis-py dropped the socket: connect again
            self._broken(ConnectionError("roger's script pipe lost its connection"))
        if self._conn is None:
            pool = self.client.connection_pool
            # Its own connection, never pooled; no health check (a PING sent between
            # calls would read a reply that belongs to one of them); a socket timeout, so
            # a reply cut short never holds the loop longer than a stall.
            kwargs = dict(pool.connection_kwargs)
            timeout = kwargs.get("socket_timeout")
            kwargs.update(health_check_interval=0,
                          socket_timeout=min(timeout or STALL_SECONDS, STALL_SECONDS))
            conn = pool.connection_class(**kwargs)
            conn.connect()
            for source in self.scripts:
                conn.send_command("SCRIPT", "LOAD", source)
                conn.read_response()
            self._conn, self._fd = conn, conn._sock.fileno()
            self.hub.add_reader(self._fd, self._readable)
        return self._conn

    def _readable(self) -> None:
        if not self._waiting:
            # Readable with no reply due: Redis closed the connection (its `timeout`, a
            # restart, CLIENT KILL) or sent what no call asked for. Close it, or the
            # loop would call this again and again; the next call connects anew.
            if self._conn is not None:
                self._broken(ConnectionError("Redis closed roger's idle script pipe"))
            return
        try:
            while self._waiting and self._conn is not None and self._conn.can_read(timeout=0):
                self._read()
        except RedisError as exc:
            self._broken(exc)

    def _read(self) -> None:
        """Read one reply and hand it to the oldest call's callback."""
        try:
            reply = self._conn.read_response()
        except ResponseError as exc:  # this call's own error; the connection is fine
            _, on_error, _ = self._waiting.popleft()
            _call(on_error, exc)
            return
        except RedisError as exc:
            self._broken(exc)
            return
        on_reply, _, _ = self._waiting.popleft()
        _call(on_reply, reply)

    def _broken(self, exc: Exception) -> None:
        """The connection is lost: every call in flight fails with ``exc``."""
        conn, fd = self._conn, self._fd
        self._conn = self._fd = None
        if fd is not None and fd in self.hub.readers:
            try:
                self.hub.remove_reader(fd)
            except Exception:  # the hub may be stopping
                logger.debug("roger: could not unregister the script pipe", exc_info=True)
        if conn is not None:
            conn.disconnect()
        waiting, self._waiting = self._waiting, collections.deque()
        if waiting:
            logger.warning("roger: %d script call(s) in flight failed: %s", len(waiting), exc)
        for _, on_error, _ in waiting:
            _call(on_error, exc)


def _call(callback: Callable[[Any], None], value: Any) -> None:
    """A callback's failure is logged; it must not stop the replies after it."""
    try:
        callback(value)
    except Exception:
        logger.exception("roger: handling a script reply failed")
