"""Where a parked job stands in its execution key's line (``Roger(app).job``), with the
key's slots (execution_limit): read-only, like store_reads.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .keys import slot_name
from .records import text
from .store import Store
from .store_reads import Reads, read, running_record
from .values import as_int


@dataclass
class ParkedPlace:
    """A parked job's place: its key's holder (and the holder's running record) and its
    position (from 1) in a line of ``parked`` jobs."""

    holder: str
    holder_record: dict[str, Any] | None
    position: int | None
    parked: int
    #: the key's limit (execution_limit: the job's own, or a live one) and the holders
    #: of its slots
    limit: int = 1
    holders: list[str] = field(default_factory=list)


def parked_place(store: Store, execution_key: str, job_id: str,
                 limit: int = 1) -> ParkedPlace:
    holder = read(store.k_holders, lambda: store.execution_key_holder(execution_key),
                  None) or ""
    live = as_int(read(store.k_limits, lambda: store.redis.hget(store.k_limits, execution_key),
                       None))
    limit = live if live is not None and live >= 1 else limit
    holders = [holder] if holder else []
    if limit > 1:
        slots = [slot_name(execution_key, i) for i in range(1, limit + 1)]
        found_holders = read(store.k_holders, lambda: store.redis.hmget(store.k_holders, slots),
                             [])
        holders = [text(h) for h in found_holders if h]
    reads = Reads(store)
    reads.add(store.k_running, None, "hget", holder)
    reads.add(store.parked_key(execution_key), None, "lpos", job_id)
    reads.add(store.parked_key(execution_key), 0, "llen")
    holder_raw, found, parked = reads.execute()
    record = store.decode(holder_raw, store.k_running, holder) if holder and holder_raw \
        else None
    position = as_int(found)
    return ParkedPlace(holder=holder,
                       holder_record=running_record(record) if record is not None else None,
                       position=None if position is None else position + 1,
                       parked=int(parked), limit=limit, holders=holders)


@dataclass
class RatePlace:
    """A job waiting on a rate key's line: its position (from 1), how many wait, the
    key's rate (live or the job's own) and seconds until its window has room."""

    position: int
    waiting: int
    starts: int
    window_ms: int
    opens_in: float


def rate_place(store: Store, rate_key: str, job_id: str, starts: int,
               window_ms: int) -> RatePlace | None:
    """Where ``job_id`` stands on ``rate_key``'s line (None: it is not on it)."""
    live = read(store.k_rate_limits, lambda: store.redis.hget(store.k_rate_limits, rate_key),
                None)
    if live is not None:
        given, _, window = text(live).partition("/")
        if given.isdigit() and window.isdigit():
            starts, window_ms = int(given), int(window)
    reads = Reads(store)
    reads.add(store.ratewait_key(rate_key), None, "lpos", job_id)
    reads.add(store.ratewait_key(rate_key), 0, "llen")
    reads.add(store.rate_key(rate_key), [], "zrange", 0, -1, withscores=True)
    found, waiting, window_entries = reads.execute()
    position = as_int(found)
    if position is None:
        return None
    now_ms = store.redis_time_ms()
    scores = sorted(score for _, score in window_entries if score > now_ms - window_ms)
    opens_in = 0.0
    if len(scores) >= starts:
        opens_in = max(0.0, (scores[len(scores) - starts] + window_ms - now_ms) / 1000)
    return RatePlace(position + 1, int(waiting), starts, window_ms, opens_in)


def rate_lines(store: Store, cap: int = 50) -> dict[str, Any]:
    """The rate keys with jobs waiting (``info()["rates"]``): how many keys, and for the
    first ``cap`` by next opening, the key, how many wait and seconds until it may move."""
    count = read(store.k_rate_due, lambda: store.redis.zcard(store.k_rate_due), 0)
    due = read(store.k_rate_due, lambda: store.redis.zrange(store.k_rate_due, 0, cap - 1,
                                                            withscores=True), [])
    if not due:
        return {"count": int(count), "keys": []}
    reads = Reads(store)
    for key, _ in due:
        reads.add(store.ratewait_key(text(key)), 0, "llen")
    waiting = reads.execute()
    now_ms = store.redis_time_ms()
    return {"count": int(count), "keys": [
        {"key": text(key), "waiting": int(n), "opens_in": round(max(0.0, at - now_ms) / 1000, 3)}
        for (key, at), n in zip(due, waiting, strict=True)]}


def throttles(store: Store, cap: int = 50) -> dict[str, Any]:
    """Queue keys inside a throttle window (queue_key_until=seconds): how many, and the
    first ``cap`` to end, each with its holder and seconds until its window ends."""
    count = read(store.k_qk_until, lambda: store.redis.zcard(store.k_qk_until), 0)
    now_ms = store.redis_time_ms()
    ending = read(store.k_qk_until, lambda: store.redis.zrangebyscore(
        store.k_qk_until, now_ms, "+inf", start=0, num=cap, withscores=True), [])
    holders = read(store.k_qkeys, lambda: store.redis.hmget(
        store.k_qkeys, [k for k, _ in ending]), []) if ending else []
    return {"count": int(count), "keys": [
        {"key": text(key), "holder": text(holder) if holder else None,
         "ends_in": round((at - now_ms) / 1000, 3)}
        for (key, at), holder in zip(ending, holders, strict=True)]}
