"""Fused publish: on a Redis broker that is roger's own Redis database, a publish with a
queue key takes the key and pushes the message in one Lua script (``publish_fused.lua``),
the way BullMQ adds a deduplicated job. The key and the message appear together: no
pending key, no grace period, no confirm, one round trip.

Where the script runs. Celery fires ``before_task_publish``, subscribes to the result and
hands the message to kombu; kombu's Redis channel ``basic_publish`` has the final message
(``_inplace_augment_message``) and knows its list (``_lookup``, ``_q_for_pri``). Roger's
interceptor (``kombu_guard.intercept``) runs there, for the one message of the publish it
was set up for (matched by job id), and nowhere else.

"Same server and database" is proven, not guessed: roger keeps a random token in its
partition (``fuse``); the publisher reads it through roger's client and the script compares
it through the broker's. A FLUSHDB or a restart without persistence removes it: the script
answers ``unproven``, changes nothing, and that publish falls back; the next one proves
again.

Everything that cannot be fused falls back to take, publish, confirm before anything is
sent: a broker channel that is not kombu's plain Redis channel (Sentinel, TLS, a
``global_keyprefix``), an exchange that is not direct or routes to no queue or to several,
a queue with ``x-expires``, a kombu publish batch. ``publish.py`` confirms after Celery's
send returns (for a batch: after the batch is flushed, see ``kombu_guard``).

A refusal is found inside kombu, after ``before_task_publish`` fired: it raises
``Refused``, which kombu does not retry (it is not a connection error), so Celery sends no
``after_task_publish`` and no ``task-sent``. The script is idempotent by job id: when a
reply is lost and kombu (or redis-py) runs it again, it answers ``replay`` (this job holds
the key: the first try pushed it), never pushes twice and never refuses its own job.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery import Celery
from kombu.transport import redis as redis_transport
from kombu.utils.json import dumps
from redis.exceptions import ResponseError

from .kombu_guard import Delivery, intercept, record_delivery
from .records import text
from .store import Store

logger = logging.getLogger("celery_roger")


class Refused(Exception):
    """Raised out of kombu: the queue key is held by ``holder``."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


class Fuse:
    """One app's fused publish: whether its broker can be fused, and the proven token."""

    def __init__(self, app: Celery, store: Store) -> None:
        self.store = store
        self.usable = (store.settings.fused_publish and store.settings.redis_client is None
                       and _plain_redis_broker(app))
        self._token: str | None = None
        self._lock = threading.Lock()
        #: whether kombu's channel reaches roger's database (checked once, by a worker)
        self._same_database: bool | None = None

    def token(self) -> str:
        """The partition's token, read (and written if missing) through roger's client."""
        token = self._token
        if token is None:
            with self._lock:
                if self._token is None:
                    self._token = self.store.fuse_token()
                token = self._token
        return token

    def disproved(self, token: str) -> None:
        """The broker's database did not hold ``token``. If roger's still does, they are
        two databases: publishes take the long road from now on. If it is gone there too
        (a FLUSHDB, a restart without persistence), a new token is written and the next
        publish is fused again."""
        with self._lock:
            if self._token != token:
                return  # another thread saw it first
            self._token = None
            if self.store.fuse_token() == token:
                self.usable = False
                logger.warning(
                    "roger: the broker's Redis database is not roger's (roger_redis_url): "
                    "publishes with a queue key take the key, publish, then confirm it")
            else:
                logger.info("roger: roger's token was gone from the broker's Redis database "
                            "(a FLUSHDB or a restart); that publish took the long road, the "
                            "next one is fused again")

    def place(self, message: Any) -> dict[str, str]:
        """For a delivered message about to be parked: its kombu payload and its list, so
        that finish.lua can push it back itself when it is promoted (one round trip for
        finish and hand-off); empty where that cannot be done as kombu would."""
        channel = getattr(message, "channel", None)
        raw = getattr(message, "_raw", None)
        if not self.usable or not isinstance(raw, dict) or channel is None:
            return {}
        info = message.delivery_info or {}
        queue = _fusable_queue(channel, info.get("exchange") or "",
                               info.get("routing_key") or "", {})
        if queue is None or not self._reaches_roger(channel):
            return {}
        return {"kombu_payload": dumps(raw),
                "kombu_list": channel._q_for_pri(queue, channel._get_message_priority(raw, False))}

    def _reaches_roger(self, channel: Any) -> bool:
        """Whether ``channel``'s Redis database is roger's: once, by the token."""
        if self._same_database is None:
            token = self.token()
            with channel.conn_or_acquire() as client:
                found = client.get(self.store.k_fuse)
            self._same_database = found is not None and text(found) == token
            if not self._same_database:
                logger.info("roger: the broker's Redis database is not roger's: a promoted "
                            "job is published again by its promoter")
        return self._same_database


def _plain_redis_broker(app: Celery) -> bool:
    """Whether the app publishes to kombu's plain Redis transport (not Sentinel, not TLS,
    no ``global_keyprefix``): the only one fused publish was tested on."""
    conn = app.connection_for_write()
    try:
        options = conn.transport_options or {}
        return (type(conn.transport) is redis_transport.Transport and not conn.ssl
                and not options.get("global_keyprefix"))
    finally:
        conn.release()


@dataclass
class FusedPublish:
    """One publish with a queue key, as seen from inside kombu.

    ``mode``: None until kombu's channel is reached, then "fused" or "fallback" (kept for
    kombu's retries of this publish, so a retry never switches road). ``sent``: the fused
    script pushed the message (or found it pushed). ``took``: the fallback took the key
    (pending), and ``publish.py`` confirms it after the send (``batch``: after that kombu
    publish batch is flushed), or releases it.
    """

    fuse: Fuse
    job_id: str
    queue_key: str
    deadline_ms: int
    #: queue_key_until seconds, in ms (a throttle window; 0 for none)
    window_ms: int = 0
    mode: str | None = None
    #: the list's queue, when fused
    queue: str | None = None
    sent: bool = False
    took: bool = False
    batch: Any = None

    def publish(self, channel: Any, original: Callable[..., Any], message: dict,
                exchange: str, routing_key: str, kwargs: dict[str, Any]) -> Any:
        if self.mode is None:
            self.queue = _fusable_queue(channel, exchange, routing_key, kwargs)
            self.mode = "fallback" if self.queue is None else "fused"
        queue = self.queue
        if self.mode == "fallback" or queue is None:
            self._take()
            self.batch = kwargs.get("_publish_batch")
            return original(channel, message, exchange, routing_key, **kwargs)
        channel._inplace_augment_message(message, exchange, routing_key)
        key = channel._q_for_pri(queue, channel._get_message_priority(message, reverse=False))
        payload = dumps(message)  # as kombu's _put
        token = self.fuse.token()
        client = _client(channel)
        try:
            outcome = self.fuse.store.publish_fused(
                client, key, token, self.queue_key, self.job_id, payload, self.deadline_ms,
                self.window_ms)
        except ResponseError as exc:  # a key of the wrong type: the guarded road
            logger.warning("roger: fused publish of %s failed (%s); it takes the long "
                           "road", self.job_id, exc)
            outcome = ["error"]
        if outcome[0] in ("unproven", "error"):
            if outcome[0] == "unproven":
                self.fuse.disproved(token)
            self.mode = "fallback"
            self._take()
            client.lpush(key, payload)
            record_delivery(queue)
            return None
        if outcome[0] == "refused":
            raise Refused(text(outcome[1]))
        self.sent = True
        record_delivery(queue)
        return None

    def _take(self) -> None:
        holder = self.fuse.store.take_queue_key(self.queue_key, self.job_id)
        if holder is not None:
            raise Refused(holder)
        self.took = True


def _client(channel: Any) -> Any:
    """The channel's redis-py client for fused publishes, made once: kombu makes a new
    one for each publish (``conn_or_acquire``), which costs redis-py 8 about 50 µs, an
    eighth of a publish. It holds no connection, only the channel's pool."""
    client = getattr(channel, "_roger_client", None)
    if client is None or client.connection_pool is not channel.pool:
        with channel.conn_or_acquire() as client:
            channel._roger_client = client
    return client


def _fusable_queue(channel: Any, exchange: str, routing_key: str,
                   kwargs: dict[str, Any]) -> str | None:
    """The one queue this message goes to, if the fused script can push it there."""
    if kwargs.get("_publish_batch") is not None:
        return None  # a kombu publish batch pushes later, in a pipeline
    if type(channel) is not redis_transport.Channel:  # Sentinel's is a subclass
        return None
    if getattr(channel, "global_keyprefix", "") or channel.connection.client.ssl:
        return None
    if not exchange:
        queue = routing_key
    else:
        if channel.typeof(exchange).type != "direct":
            return None
        queues = list(channel._lookup(exchange, routing_key))
        if len(queues) != 1:
            return None
        queue = queues[0]
    if not queue or queue in (getattr(channel, "_expires", None) or {}):
        return None
    return str(queue)


def fusing(request: FusedPublish, seen: Delivery) -> intercept:
    """Within this block, kombu's Redis channel publishes ``request``'s job through it;
    ``seen`` records where the message went."""

    def interceptor(channel: Any, original: Callable[..., Any], message: dict,
                    exchange: str, routing_key: str, kwargs: dict[str, Any]) -> Any:
        if (message.get("headers") or {}).get("id") != request.job_id:
            return original(channel, message, exchange, routing_key, **kwargs)
        return request.publish(channel, original, message, exchange, routing_key, kwargs)

    return intercept(interceptor, seen)
