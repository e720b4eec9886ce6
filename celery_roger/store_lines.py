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
