"""The console's lists: a page of each kind of roger state, with a cursor for the next.

``page(store, kind, limit=..., cursor=..., **filters)`` -> ``{"kind", "items", "cursor",
"total"}``; ``cursor`` is an opaque string (None: no more), ``total`` how many there are
in all when Redis can say it without scanning (None when a filter is applied after the
read). Every page is bounded: it reads what its index gives, and a filter that is not an
index (a running job's task, a retry's queue) examines at most ``SCAN_BUDGET`` entries
before it returns what it found with a cursor to go on. No page scans the keyspace.

What each kind is read from (docs/design.md, "The console's lists"):

* ``running``: ``HSCAN running``; filters ``queue``, ``task``, ``worker``.
* ``execution_keys``: ``HSCAN holders`` (``prefix`` as its MATCH), each with its line's
  length; ``queue_keys``: ``HSCAN qkeys`` (``prefix``). For these three ``limit`` is
  Redis's SCAN hint: a page may hold a few more or fewer rows.
* ``parked``: with ``key``, that execution key's line in order (``position`` from 1);
  without, the keys that have a line (``HSCAN holders``), with its length.
* ``held``: the jobs held for a paused queue (``queue``, or every queue in turn).
* ``retries`` (by due time; ``queue``, ``task``, ``since``/``until`` on the due time),
  ``cancelled`` (by when the cancellation is forgotten), ``buried`` (newest first;
  ``queue``, ``task`` and ``error`` are indexes, ``since``/``until`` on the burial time).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any

from .inspect import buried_job
from .job import BuriedJob
from .lists_scan import (
    SCAN_BUDGET,
    Filters,
    Page,
    _entries,
    _int,
    _split,
    _stored_item,
    execution_keys,
    held,
    parked,
    queue_keys,
    running,
)
from .records import text
from .store import Store
from .store_reads import read
from .values import as_count, as_dict

KINDS = ("running", "parked", "execution_keys", "queue_keys", "retries", "held",
         "cancelled", "buried")
#: The most rows one page returns.
MAX_LIMIT = 500
#: How many entries one read of an index fetches.
BATCH = 200


def filters(given: dict[str, Any]) -> Filters:
    """``Filters`` from keyword arguments, each checked (a ValueError names what is wrong)."""
    known = set(Filters.__dataclass_fields__)
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"unknown filter {unknown[0]!r}: the filters are {sorted(known)}")
    checked: dict[str, Any] = {}
    for name, value in given.items():
        if value is None:
            continue
        if name in ("since", "until"):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be Unix seconds (a number >= 0), got {value!r}")
            checked[name] = float(value)
        elif not isinstance(value, str) or not value:
            raise ValueError(f"filter {name} must be a non-empty str, got {value!r:.80}")
        else:
            checked[name] = value
    return Filters(**checked)


def page(store: Store, kind: str, *, limit: int, cursor: str | None,
         filters: Filters) -> dict[str, Any]:
    """One page of ``kind`` (see the module's docstring)."""
    reader = _READERS[kind]
    items, next_cursor, total = reader(store, limit, cursor, filters)
    return {"kind": kind, "items": items, "cursor": next_cursor, "total": total}


def _score_text(score: float) -> str:
    return str(int(score)) if float(score).is_integer() else repr(score)


# -- sorted sets: walked from a (score, member) cursor ---------------------------------------


def _zbatches(store: Store, key: str, cursor: str | None, *, rev: bool, lo: float | str,
              hi: float | str) -> Iterator[list[tuple[str, float]]]:
    """Batches of ``(member, score)`` of ``key`` within [lo, hi], in score order (reversed
    with ``rev``), after the cursor ``"<score>|<member>"`` (ties broken as Redis orders
    them: by member)."""
    start = _split(cursor, "sorted")
    try:
        bound: float | str = float(start[0]) if start else (hi if rev else lo)
    except ValueError:
        bound = math.nan
    if isinstance(bound, float) and not math.isfinite(bound):
        raise ValueError(f"cursor {cursor!r} is not a cursor from this list")
    after = start[1] if start else None
    offset = 0
    while True:
        if rev:
            rows = read(key, partial(store.redis.zrevrangebyscore, key, bound, lo,
                                     start=offset, num=BATCH, withscores=True), [])
        else:
            rows = read(key, partial(store.redis.zrangebyscore, key, bound, hi,
                                     start=offset, num=BATCH, withscores=True), [])
        batch = []
        for member, score in rows:
            name = text(member)
            if after is not None and score == bound and (name >= after if rev else name <= after):
                continue
            batch.append((name, score))
        if batch:
            yield batch
        if len(rows) < BATCH:
            return
        offset += len(rows)


def _take(batches: Iterable[list[Any]], fetch: Callable[[list[Any]], list[Any]],
          limit: int, cursor_of: Callable[[Any], str]) -> tuple[list[dict[str, Any]], str | None]:
    """Rows turned into items by ``fetch`` (None: gone or filtered out) until ``limit``
    items or ``SCAN_BUDGET`` rows; the cursor of the last row taken, None at the end."""
    items: list[dict[str, Any]] = []
    examined = 0
    for batch in batches:
        for row, item in zip(batch, fetch(batch), strict=True):
            examined += 1
            if item is not None:
                items.append(item)
            if len(items) >= limit or examined >= SCAN_BUDGET:
                return items, cursor_of(row)
    return items, None


def _zcursor(row: tuple[str, float]) -> str:
    return f"{_score_text(row[1])}|{row[0]}"


def _zcount(store: Store, key: str, lo: float | str, hi: float | str) -> int:
    if lo == "-inf" and hi == "+inf":
        return int(read(key, lambda: store.redis.zcard(key), 0))
    return int(read(key, lambda: store.redis.zcount(key, lo, hi), 0))


def _range(f: Filters, scale: float) -> tuple[float | str, float | str]:
    return ("-inf" if f.since is None else f.since * scale,
            "+inf" if f.until is None else f.until * scale)


# -- the kinds ----------------------------------------------------------------------------------


def _retries(store: Store, limit: int, cursor: str | None, f: Filters) -> Page:
    lo, hi = _range(f, 1000)

    def fetch(rows: list[tuple[str, float]]) -> list[dict[str, Any] | None]:
        entries = _entries(store, store.k_retry_msg, [job for job, _ in rows])
        items = [None if e is None else {**_stored_item(job, e), "due_at": score / 1000}
                 for (job, score), e in zip(rows, entries, strict=True)]
        return [i if i is not None and f.keeps(i, "queue", "task") else None for i in items]

    items, nxt = _take(_zbatches(store, store.k_retry, cursor, rev=False, lo=lo, hi=hi),
                       fetch, limit, _zcursor)
    total = None if f.queue or f.task else _zcount(store, store.k_retry, lo, hi)
    return items, nxt, total


def _cancelled(store: Store, limit: int, cursor: str | None, f: Filters) -> Page:
    def fetch(rows: list[tuple[str, float]]) -> list[dict[str, Any] | None]:
        return [{"id": job, "forgotten_at": score / 1000} for job, score in rows]

    items, nxt = _take(_zbatches(store, store.k_cancelled, cursor, rev=False, lo="-inf",
                                 hi="+inf"), fetch, limit, _zcursor)
    return items, nxt, _zcount(store, store.k_cancelled, "-inf", "+inf")


def buried_index(store: Store, f: Filters) -> tuple[str, tuple[str, ...]]:
    """The index a buried page reads (the narrowest filter that is one) and the filters
    left to apply after the read."""
    if f.task is not None:
        return f"{store.prefix}buried_by_task:{f.task}", ("queue", "error_type")
    if f.error is not None:
        return f"{store.prefix}buried_by_error:{f.error}", ("queue",)
    if f.queue is not None:
        return store.buried_key(f.queue), ()
    return store.k_buried, ()


def _buried(store: Store, limit: int, cursor: str | None, f: Filters) -> Page:
    index, after = buried_index(store, f)
    wanted = {"queue": f.queue, "error_type": f.error}
    after = tuple(n for n in after if wanted[n] is not None)
    lo, hi = _range(f, 1e6)

    def fetch(rows: list[tuple[str, float]]) -> list[dict[str, Any] | None]:
        entries = _entries(store, store.k_buried_msg, [job for job, _ in rows])
        items = [None if e is None else _buried_item(buried_job(job, e, score))
                 for (job, score), e in zip(rows, entries, strict=True)]
        return [i if i is not None and all(i[n] == wanted[n] for n in after) else None
                for i in items]

    items, nxt = _take(_zbatches(store, index, cursor, rev=True, lo=lo, hi=hi), fetch, limit,
                       _zcursor)
    return items, nxt, None if after else _zcount(store, index, lo, hi)


def _buried_item(job: BuriedJob) -> dict[str, Any]:
    return {**vars(job), "args": list(job.args)}  # as JSON has it


def buried_facets(store: Store) -> dict[str, dict[str, int]]:
    """How many jobs are buried per task, per error type and per queue (the filters)."""
    facets: dict[str, dict[str, int]] = {"task": {}, "error": {}, "queue": {}}
    key = store.prefix + "buried_facets"
    raw = read(key, lambda: store.redis.hgetall(key), {})
    for name, count in as_dict(raw).items():
        facet, _, value = text(name).partition(":")
        if facet in facets and (n := as_count(_int(count))):
            facets[facet][value] = n
    queues = sorted(text(q) for q in read(store.k_buried_queues, lambda: store.redis.smembers(
        store.k_buried_queues), set()))
    pipe = store.redis.pipeline(transaction=False)
    for queue in queues:
        pipe.zcard(store.buried_key(queue))
    for queue, count in zip(queues, pipe.execute(raise_on_error=False), strict=True):
        if isinstance(count, int) and count:
            facets["queue"][queue] = count
    return facets


_READERS: dict[str, Callable[[Store, int, str | None, Filters], Page]] = {
    "running": running, "parked": parked, "execution_keys": execution_keys,
    "queue_keys": queue_keys, "retries": _retries, "held": held, "cancelled": _cancelled,
    "buried": _buried,
}
