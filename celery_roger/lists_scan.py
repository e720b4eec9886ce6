"""The console's lists, part two: what is read from hashes and lists (running jobs, held
keys, parked lines, held jobs), and what every list shares (filters, cursors, entries).
``lists.page`` is the entry point; see its module for the rules every page keeps."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

from .job import job_header
from .records import StoredJob, text
from .store import Store
from .store_reads import _glob_escape, read, running_record
from .values import as_count, as_str, field_name

#: The most entries one page examines for a filter that is not an index.
SCAN_BUDGET = 5000
#: The least COUNT a page's HSCAN calls ask for (a page's budget is spent in such calls).
HSCAN_COUNT = 50

@dataclass(frozen=True)
class Filters:
    """What a page may be narrowed by (None: not narrowed); times in Unix seconds."""

    queue: str | None = None
    task: str | None = None
    error: str | None = None
    worker: str | None = None
    key: str | None = None
    prefix: str | None = None
    since: float | None = None
    until: float | None = None

    def keeps(self, item: dict[str, Any], *names: str) -> bool:
        return all(getattr(self, n) is None or item.get(n) == getattr(self, n) for n in names)


Page = tuple[list[dict[str, Any]], str | None, int | None]


# -- cursors ---------------------------------------------------------------------------------


def _split(cursor: str | None, what: str) -> tuple[str, str] | None:
    if not cursor:
        return None
    head, sep, tail = cursor.partition("|")
    if not sep:
        raise ValueError(f"cursor {cursor[:60]!r} is not a {what} cursor from this list")
    return head, tail


def _int_cursor(cursor: str | None) -> int:
    if not cursor:
        return 0
    try:
        value = int(cursor)
    except ValueError:
        raise ValueError(f"cursor {cursor[:60]!r} is not a cursor from this list") from None
    if value < 0:
        raise ValueError(f"cursor must be >= 0, got {value}")
    return value


def _entries(store: Store, hash_key: str, ids: list[str]) -> list[dict[str, Any] | None]:
    """The JSON entries of ``ids`` in ``hash_key`` (None: gone or unreadable)."""
    raws = read(hash_key, lambda: store.redis.hmget(hash_key, ids), [None] * len(ids))
    return [None if raw is None else store.decode(raw, hash_key, field_name(job),
                                                  kombu=True)
            for job, raw in zip(ids, raws, strict=True)]


def _stored_item(job_id: str, entry: dict[str, Any]) -> dict[str, Any]:
    """What a list shows of a job kept as a message or a publish entry."""
    stored = StoredJob.of(entry)
    header = job_header(stored.headers)
    task = as_str(stored.headers.get("task")) or as_str((stored.entry or {}).get("task"))
    return {"id": job_id, "task": task, "queue": as_str(header.get("q")),
            "execution_key": as_str(header.get("ek")), "queue_key": as_str(header.get("qk")),
            "retry_count": as_count(header.get("rc")) or 0}


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


# -- hashes and lists ----------------------------------------------------------------------


def _hscan(store: Store, key: str, cursor: str | None, limit: int, match: str | None,
           ) -> Iterator[tuple[int, dict[Any, Any]]]:
    """HSCAN batches of ``key`` from ``cursor``: (the cursor after it, its fields)."""
    at = _int_cursor(cursor)
    limit = max(limit, HSCAN_COUNT)
    while True:
        at, found = read(key, partial(store.redis.hscan, key, at, match=match, count=limit),
                         (0, {}))
        yield int(at), dict(found) if isinstance(found, dict) else {}
        if not at:
            return


def _scanned(batches: Iterator[tuple[int, dict[Any, Any]]], limit: int,
             make: Callable[[dict[Any, Any]], list[dict[str, Any]]]) -> tuple[
                 list[dict[str, Any]], str | None]:
    """Whole HSCAN batches until ``limit`` items or ``SCAN_BUDGET`` fields."""
    items: list[dict[str, Any]] = []
    examined = 0
    for at, found in batches:
        examined += max(limit, HSCAN_COUNT)  # (a MATCH may return none of what it examined)
        items.extend(make(found))
        if at and (len(items) >= limit or examined >= SCAN_BUDGET):
            return items, str(at)
    return items, None


def running(store: Store, limit: int, cursor: str | None, f: Filters) -> Page:
    def make(found: dict[Any, Any]) -> list[dict[str, Any]]:
        items = []
        for name, raw in found.items():
            record = store.decode(raw, store.k_running, field_name(name))
            if record is not None:
                r = running_record(record)
                item = {"id": text(name), "task": r["task"], "queue": r["queue"],
                        "worker": r["worker"], "pid": r["pid"], "admitted_at": r["admitted_at"],
                        "execution_key": r["ek"], "queue_key": r["qk"]}
                if f.keeps(item, "queue", "task", "worker"):
                    items.append(item)
        return sorted(items, key=lambda i: i["admitted_at"] or 0)

    items, nxt = _scanned(_hscan(store, store.k_running, cursor, limit, None), limit, make)
    total = None if f.queue or f.task or f.worker else \
        int(read(store.k_running, lambda: store.redis.hlen(store.k_running), 0))
    return items, nxt, total


def _match(f: Filters) -> str | None:
    return None if not f.prefix else _glob_escape(f.prefix) + "*"


def _line_lengths(store: Store, keys: list[str]) -> list[int]:
    pipe = store.redis.pipeline(transaction=False)
    for key in keys:
        pipe.llen(store.parked_key(key))
    return [n if isinstance(n, int) else 0 for n in pipe.execute(raise_on_error=False)]


def _holders(store: Store, found: dict[Any, Any], lines_only: bool) -> list[dict[str, Any]]:
    rows = []
    for name, holder in found.items():
        key, _, slot = text(name).partition("\0#")
        rows.append({"key": key, "slot": int(slot) if slot.isascii() and slot.isdecimal() else 1,
                     "holder": text(holder)})
    for row, n in zip(rows, _line_lengths(store, [str(r["key"]) for r in rows]), strict=True):
        row["parked"] = n
    if lines_only:  # one row per key that has a line, whichever slot
        rows = [r for r in rows if r["parked"] and r["slot"] == 1]
    return sorted(rows, key=lambda r: (r["key"], r["slot"]))


def execution_keys(store: Store, limit: int, cursor: str | None, f: Filters) -> Page:
    items, nxt = _scanned(_hscan(store, store.k_holders, cursor, limit, _match(f)), limit,
                          lambda found: _holders(store, found, False))
    total = None if f.prefix else \
        int(read(store.k_holders, lambda: store.redis.hlen(store.k_holders), 0))
    return items, nxt, total


def queue_keys(store: Store, limit: int, cursor: str | None, f: Filters) -> Page:
    def make(found: dict[Any, Any]) -> list[dict[str, Any]]:
        keys = sorted(text(k) for k in found)
        pipe = store.redis.pipeline(transaction=False)
        for key in keys:
            pipe.zscore(store.k_qk_pending, key)
        pending = pipe.execute(raise_on_error=False)
        by_name = {text(k): text(v) for k, v in found.items()}
        return [{"key": k, "job": by_name[k],
                 "pending_until": p / 1000 if isinstance(p, float) else None}
                for k, p in zip(keys, pending, strict=True)]

    items, nxt = _scanned(_hscan(store, store.k_qkeys, cursor, limit, _match(f)), limit, make)
    total = None if f.prefix else \
        int(read(store.k_qkeys, lambda: store.redis.hlen(store.k_qkeys), 0))
    return items, nxt, total


def _line(store: Store, line: str, entries_key: str, offset: int, limit: int,
          ) -> list[dict[str, Any]]:
    """Jobs ``offset``.. of a list of ids, each with its ``position`` (from 1)."""
    ids = [text(j) for j in read(line, lambda: store.redis.lrange(
        line, offset, offset + limit - 1), [])]
    entries = _entries(store, entries_key, ids)
    return [{**(_stored_item(job, e) if e is not None else {"id": job}),
             "position": offset + i + 1} for i, (job, e) in enumerate(zip(ids, entries,
                                                                             strict=True))]


def parked(store: Store, limit: int, cursor: str | None, f: Filters) -> Page:
    if f.key is None:  # the lines
        items, nxt = _scanned(_hscan(store, store.k_holders, cursor, limit, _match(f)), limit,
                              lambda found: _holders(store, found, True))
        counts = read(store.k_parked_count, lambda: store.redis.hvals(store.k_parked_count), [])
        return items, nxt, sum(n for n in map(_int, counts) if n and n > 0)
    line = store.parked_key(f.key)
    offset = _int_cursor(cursor)
    items = _line(store, line, store.k_msg, offset, limit)
    total = int(read(line, lambda: store.redis.llen(line), 0))
    return items, (str(offset + len(items)) if offset + len(items) < total else None), total


def held(store: Store, limit: int, cursor: str | None, f: Filters) -> Page:
    if f.queue is not None:
        queues, first, offset = [f.queue], f.queue, _int_cursor(cursor)
    else:
        queues = sorted(text(q) for q in read(store.k_held_queues, lambda: store.redis.smembers(
            store.k_held_queues), set()))
        at = _split(cursor, "held")
        first, offset = (at[1], _int_cursor(at[0])) if at else (queues[0] if queues else "", 0)
    items: list[dict[str, Any]] = []
    for queue in [q for q in queues if q >= first]:
        found = _line(store, store.held_key(queue), store.k_held_msg, offset, limit - len(items))
        items.extend({**i, "queue": queue} for i in found)
        if len(items) >= limit:
            nxt = str(offset + len(found)) if f.queue else f"{offset + len(found)}|{queue}"
            return items, nxt, None
        offset = 0
    return items, None, None
