"""Roger's Redis layer: the reads inspection needs (``Roger(app).info()``, ``.job(id)``,
``.keys()``, ``.buried()``), each a bounded read in one or two round trips.

Nothing read here is trusted (poison-proofing, docs/design.md): a key of the wrong type
reads as empty (logged at most once a minute; the next script that touches it moves it
to the quarantine), a hash value that is not what roger wrote is moved to the quarantine
(``Store.decode``), and a field of the wrong type reads as absent (values.py). These
functions never raise on what they find in Redis; connection errors propagate.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis

from .keys import base_key
from .records import text
from .store import Store
from .values import as_dict, as_int, as_key_or_none, as_str, as_time, as_time_ms, field_name

logger = logging.getLogger("celery_roger")

#: How many entries of what can be long (queue keys, cancellations) a read returns.
LIST_CAP = 100
#: A key that cannot be read is logged at most once per this many seconds (per process):
#: the dashboard and /metrics read it every few seconds.
UNREADABLE_LOG_SECONDS = 60.0

T = TypeVar("T")
_unreadable_logged: dict[str, float] = {}


def _unreadable(key: str, exc: Exception) -> None:
    now = time.monotonic()
    last = _unreadable_logged.get(key)
    if last is None or now - last >= UNREADABLE_LOG_SECONDS:
        _unreadable_logged[key] = now
        logger.error("roger: cannot read %s (%s): read as empty; the next roger script that "
                     "touches it moves it to the quarantine", key, exc)


def read(key: str, fn: Callable[[], T], empty: Any) -> T:
    """``fn()``, a read of the one key ``key``; if Redis refuses it (a key of the wrong
    type: WRONGTYPE), ``empty``, and an ERROR log naming the key."""
    try:
        return fn()
    except redis.ResponseError as exc:
        _unreadable(key, exc)
        return empty


class Reads:
    """A pipeline of reads, each of one key, with ``read``'s rule per read:
    ``add(key, empty, "hgetall")`` ..., then ``execute()`` (one round trip)."""

    def __init__(self, store: Store) -> None:
        self.pipe = store.redis.pipeline(transaction=False)
        self.reads: list[tuple[str, Any]] = []

    def add(self, key: str, empty: Any, command: str, *args: Any, **kwargs: Any) -> None:
        getattr(self.pipe, command)(key, *args, **kwargs)
        self.reads.append((key, empty))

    def execute(self) -> list[Any]:
        if not self.reads:
            return []
        results = []
        for (key, empty), result in zip(self.reads, self.pipe.execute(raise_on_error=False),
                                        strict=True):
            if isinstance(result, redis.ResponseError):
                _unreadable(key, result)
                result = empty
            results.append(result)
        return results


# -- records ----------------------------------------------------------------------------


def counters(store: Store, key: str, raw: Any) -> dict[str, int]:
    """A hash of counters (``HGETALL``); a value that is not an integer is quarantined."""
    found = {}
    for name, value in as_dict(raw).items():
        try:
            found[text(name)] = int(value)
        except (TypeError, ValueError):
            store.quarantine(key, field_name(name), value, "not an integer")
    return found


def running_record(record: dict[str, Any]) -> dict[str, Any]:
    """A ``running`` record, each field of the type roger writes (else None)."""
    return {
        "task": as_str(record.get("task")), "queue": as_str(record.get("queue")) or "",
        "worker": as_str(record.get("worker")), "pid": as_int(record.get("pid")),
        "admitted_at": as_time(record.get("admitted_at")),
        "qk": as_key_or_none(record.get("qk")), "ek": as_key_or_none(record.get("ek")),
        "instance": as_key_or_none(record.get("instance")),
    }


def running_records(store: Store, raw: Any) -> dict[str, dict[str, Any]]:
    found = {}
    for name, value in as_dict(raw).items():
        record = store.decode(value, store.k_running, field_name(name))
        if record is not None:
            found[text(name)] = running_record(record)
    return found


def pause_record(record: Any) -> dict[str, Any]:
    record = as_dict(record)
    return {"at": as_time(record.get("at")), "reason": as_str(record.get("reason"))}


def paused(store: Store, raw: Any = None) -> dict[str, dict[str, Any]]:
    """Paused queues and their records, from an ``HGETALL paused`` already read (``raw``)
    when every record in it is readable, else read again by ``Store.paused`` (which
    quarantines an unreadable record and keeps its queue paused)."""
    if raw is not None:
        found = {}
        for name, value in as_dict(raw).items():
            try:
                record = json.loads(value)
            except (TypeError, ValueError):
                break
            if not isinstance(record, dict):
                break
            found[text(name)] = pause_record(record)
        else:
            return found
    records = read(store.k_paused, store.paused, {})
    return {queue: pause_record(record) for queue, record in records.items()}


def leases(instances: list[str], scores: Any, now_ms: float) -> dict[str, dict[str, Any]]:
    if not isinstance(scores, list) or len(scores) != len(instances):
        scores = [None] * len(instances)
    return {i: {"lease_expires": as_time_ms(s),
                "alive": isinstance(s, (int, float)) and s > now_ms}
            for i, s in zip(instances, scores, strict=True)}


def lease_info(store: Store, instances: list[str], now_ms: float) -> dict[str, dict[str, Any]]:
    if not instances:
        return {}
    scores = read(store.k_workers, lambda: store.redis.zmscore(store.k_workers, instances), [])
    return leases(instances, scores, now_ms)


# -- the partition at a glance (info) -----------------------------------------------------


@dataclass
class Overview:
    """What ``info()`` shows, read in two round trips."""

    now_ms: float
    running: dict[str, dict[str, Any]]
    holders: dict[str, str]
    paused: dict[str, dict[str, Any]]
    parked_per_queue: dict[str, int]
    qk_count: int
    qk_sample: dict[str, str]
    cancel_count: int
    cancels: list[str]
    retry_count: int
    parked_total: int
    buried_total: int
    dropped: dict[str, int]
    quarantined: int = 0
    leases: dict[str, dict[str, Any]] = field(default_factory=dict)
    parked_per_key: dict[str, int] = field(default_factory=dict)
    buried_per_queue: dict[str, int] = field(default_factory=dict)
    held_per_queue: dict[str, int] = field(default_factory=dict)


def overview(store: Store) -> Overview:
    now_ms = store.redis_time_ms()
    reads = Reads(store)
    reads.add(store.k_running, {}, "hgetall")
    reads.add(store.k_holders, {}, "hgetall")
    reads.add(store.k_paused, {}, "hgetall")
    reads.add(store.k_parked_count, {}, "hgetall")
    reads.add(store.k_buried_queues, set(), "smembers")
    reads.add(store.k_qkeys, 0, "hlen")
    reads.add(store.k_qkeys, (0, {}), "hscan", 0, count=LIST_CAP)
    reads.add(store.k_cancelled, 0, "zcard")
    reads.add(store.k_cancelled, [], "zrevrangebyscore", "+inf", now_ms, start=0,
              num=LIST_CAP)
    reads.add(store.k_retry, 0, "zcard")
    reads.add(store.k_msg, 0, "hlen")
    reads.add(store.k_buried_msg, 0, "hlen")
    reads.add(store.k_buried_dropped, {}, "hgetall")
    (running_raw, holders_raw, paused_raw, parked_count_raw, buried_queues, qk_count, qk_scan,
     cancel_count, cancels, retry_count, parked_total, buried_total,
     dropped_raw) = reads.execute()
    qk_sample = qk_scan[1] if isinstance(qk_scan, (list, tuple)) and len(qk_scan) == 2 else {}
    view = Overview(
        now_ms=now_ms, running=running_records(store, running_raw),
        holders={text(k): text(j) for k, j in as_dict(holders_raw).items()},
        paused=paused(store, paused_raw),
        parked_per_queue={q: n for q, n in counters(
            store, store.k_parked_count, parked_count_raw).items() if n > 0},
        qk_count=int(qk_count),
        qk_sample={text(k): text(j) for k, j in as_dict(qk_sample).items()},
        cancel_count=int(cancel_count), cancels=[text(c) for c in cancels],
        retry_count=int(retry_count), parked_total=int(parked_total),
        buried_total=int(buried_total),
        dropped=counters(store, store.k_buried_dropped, dropped_raw))
    _count_per_key_and_queue(store, view, sorted(text(q) for q in buried_queues)
                             if isinstance(buried_queues, set) else [])
    return view


def _count_per_key_and_queue(store: Store, view: Overview, queues_buried: list[str]) -> None:
    """The second round trip of ``overview``: leases of the workers running jobs, and the
    lengths of the lines behind each key, of each buried queue, of each held queue."""
    instances = sorted({r["instance"] for r in view.running.values() if r["instance"]})
    reads = Reads(store)
    # After the values read above were checked: counts those just moved aside too.
    reads.add(store.k_stats, None, "hget", "quarantined")
    if instances:
        reads.add(store.k_workers, [], "zmscore", instances)
    for key in view.holders:  # a slot's line is its key's (execution_limit)
        reads.add(store.parked_key(base_key(key)), 0, "llen")
    for queue in queues_buried:
        reads.add(store.buried_key(queue), 0, "zcard")
    for queue in view.paused:
        reads.add(store.held_key(queue), 0, "llen")
    counts = reads.execute()
    view.quarantined = max(0, counters(store, store.k_stats,
                                       {"quarantined": counts.pop(0) or 0}).get("quarantined", 0))
    view.leases = leases(instances, counts.pop(0), view.now_ms) if instances else {}
    view.parked_per_key = {k: int(n) for k, n in zip(view.holders, counts, strict=False)}
    counts = counts[len(view.holders):]
    view.buried_per_queue = {q: int(n) for q, n in zip(queues_buried, counts, strict=False)}
    view.held_per_queue = {q: int(n) for q, n in zip(view.paused, counts[len(queues_buried):],
                                                      strict=False)}


# -- one job ------------------------------------------------------------------------------


@dataclass
class JobRecords:
    """Where roger keeps one job, each a decoded stored value or None."""

    now_ms: float
    running: dict[str, Any] | None
    buried: dict[str, Any] | None
    retry_at: Any
    retry: dict[str, Any] | None
    #: cancelled (the cancellation has not expired), until when (None: unreadable)
    cancelled: bool
    cancelled_until: float | None
    cancel_reported: bool
    parked: dict[str, Any] | None
    promoting: bool
    held: dict[str, Any] | None
    #: its history (``roger_history_ttl``), oldest first: {at, event, worker, detail}
    history: list[dict[str, Any]]


def history_entries(raw: Any) -> list[dict[str, Any]]:
    """``hist:<job>`` entries (``<ms>\t<event>\t<worker>\t<detail>``, lib.lua's
    ``history``) as dicts; an entry of another shape is shown as its text."""
    entries: list[dict[str, Any]] = []
    for item in raw if isinstance(raw, list) else []:
        parts = text(item).split("\t", 3)
        try:
            at = int(parts[0]) / 1000
        except ValueError:
            at = None
        if at is None or len(parts) < 4:
            entries.append({"at": None, "event": "unreadable entry", "worker": None,
                            "detail": text(item)[:200]})
            continue
        entries.append({"at": at, "event": parts[1], "worker": parts[2] or None,
                        "detail": parts[3] or None})
    return entries


def job_records(store: Store, job_id: str) -> JobRecords:
    now_ms = store.redis_time_ms()
    reads = Reads(store)
    reads.add(store.k_running, None, "hget", job_id)
    reads.add(store.k_retry, None, "zscore", job_id)
    reads.add(store.k_retry_msg, None, "hget", job_id)
    reads.add(store.k_buried_msg, None, "hget", job_id)
    reads.add(store.k_cancelled, None, "zscore", job_id)
    reads.add(store.k_cancel_reported, None, "zscore", job_id)
    reads.add(store.k_msg, None, "hget", job_id)
    reads.add(store.k_promoting, None, "zscore", job_id)
    reads.add(store.k_held_msg, None, "hget", job_id)
    reads.add(store.history_key(job_id), [], "lrange", 0, -1)
    (running, retry_at, retry, buried, cancelled, reported, parked, promoting,
     held, history) = reads.execute()

    def decoded(raw: Any, key: str, kombu: bool = False) -> dict[str, Any] | None:
        return store.decode(raw, key, job_id, kombu=kombu) if raw else None

    live = isinstance(cancelled, (int, float)) and cancelled > now_ms
    return JobRecords(
        now_ms=now_ms, running=decoded(running, store.k_running),
        buried=decoded(buried, store.k_buried_msg, True), retry_at=retry_at,
        retry=decoded(retry, store.k_retry_msg, True) if retry_at is not None else None,
        cancelled=live, cancelled_until=as_time_ms(cancelled) if live else None,
        cancel_reported=reported is not None, parked=decoded(parked, store.k_msg),
        promoting=promoting is not None, held=decoded(held, store.k_held_msg, True),
        history=history_entries(history))


# -- for the operator's actions (api.py) -------------------------------------------------


def execution_key_holder(store: Store, execution_key: str) -> str | None:
    return read(store.k_holders, lambda: store.execution_key_holder(execution_key), None)


def parked_messages(store: Store) -> list[tuple[str, dict[str, Any]]]:
    return read(store.k_msg, lambda: list(store.parked_messages()), [])


def paused_queues(store: Store) -> set[str]:
    return set(read(store.k_paused, store.paused, {}))


# -- counters, keys, the buried queue -------------------------------------------------------


def stats(store: Store) -> dict[str, int]:
    return counters(store, store.k_stats,
                    read(store.k_stats, lambda: store.redis.hgetall(store.k_stats), {}))


def quarantined(store: Store) -> dict[str, dict[str, Any]]:
    return read(store.k_quarantine, store.quarantined, {})


def keys_page(store: Store, kind: str, prefix: str | None, limit: int,
              cursor: int) -> tuple[int, list[tuple[str, str]]]:
    """(next cursor or 0, [(key, holder)]) of queue keys or execution keys."""
    hash_key = store.k_qkeys if kind == "queue" else store.k_holders
    match = None if not prefix else _glob_escape(prefix) + "*"
    next_cursor, page = read(
        hash_key, lambda: store.redis.hscan(hash_key, cursor, match=match, count=limit),
        (0, {}))
    pairs: dict[Any, Any] = dict(page) if isinstance(page, dict) else {}
    return int(next_cursor), sorted((text(k), text(v)) for k, v in pairs.items())


def _glob_escape(pattern: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in pattern)


def buried_page(store: Store, queue: str | None, offset: int,
                limit: int) -> list[tuple[str, dict[str, Any], Any]]:
    """A page of buried entries, newest first: (job id, entry, score in µs)."""
    zset = store.k_buried if queue is None else store.buried_key(queue)
    page: list[Any] = read(zset, lambda: store.redis.zrevrange(
        zset, offset, offset + limit - 1, withscores=True), [])
    if not page:
        return []
    names = [name for name, _ in page]
    raws: list[Any] = read(store.k_buried_msg,
                           lambda: store.redis.hmget(store.k_buried_msg, names), [])
    found = []
    for (name, score), raw in zip(page, raws, strict=False):
        if raw is None:
            continue
        entry = store.decode(raw, store.k_buried_msg, field_name(name), kombu=True)
        if entry is not None:
            found.append((text(name), entry, score))
    return found


def buried_ids(store: Store, queue: str) -> list[str]:
    return read(store.buried_key(queue), lambda: store.buried_ids(queue), [])


def buried_queues(store: Store) -> list[str]:
    return read(store.k_buried_queues, store.buried_queues, [])


def buried_dropped(store: Store) -> dict[str, int]:
    return counters(store, store.k_buried_dropped, read(
        store.k_buried_dropped, lambda: store.redis.hgetall(store.k_buried_dropped), {}))
