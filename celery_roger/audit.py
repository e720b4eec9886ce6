"""The console's audit log: every action taken through the dashboard (who, what, on what,
when, with what result), newest first, in a bounded Redis list (``audit``)."""

from __future__ import annotations

import json
import time
from typing import Any

from .records import text
from .store import Store
from .store_reads import read

#: How many entries the audit log keeps (the oldest go first): about 200 bytes each,
#: at most about 3 KB (a bulk action's ids: the first ``SAMPLE`` are kept).
AUDIT_MAX = 10_000
SAMPLE = 20


def audit_key(store: Store) -> str:
    return store.prefix + "audit"


def record(store: Store, label: str, action: str, target: str,
           result: dict[str, Any] | None = None) -> None:
    """Append one entry: ``label`` (whose token), ``action``, ``target``, ``result``."""
    entry = json.dumps({"at": time.time(), "label": label, "action": action,
                        "target": target, "result": _compact(result or {})}, default=str)
    key = audit_key(store)
    pipe = store.redis.pipeline(transaction=False)  # (no MULTI: Redis Cluster clients)
    pipe.lpush(key, entry)
    pipe.ltrim(key, 0, AUDIT_MAX - 1)
    pipe.execute()


def _compact(result: dict[str, Any]) -> dict[str, Any]:
    """A result as the log keeps it: a list or dict of more than ``SAMPLE`` items (a bulk
    action's ids) is cut to its first ``SAMPLE``, with ``<name>_count`` saying how many."""
    kept: dict[str, Any] = {}
    for name, value in result.items():
        if isinstance(value, (list, dict)) and len(value) > SAMPLE:
            kept[f"{name}_count"] = len(value)
            value = value[:SAMPLE] if isinstance(value, list) else \
                dict(list(value.items())[:SAMPLE])
        kept[name] = value
    return kept


def entries(store: Store, limit: int, offset: int = 0) -> list[dict[str, Any]]:
    """Entries ``offset``.. of the log, newest first (an unreadable one is shown as such)."""
    key = audit_key(store)
    found = []
    for raw in read(key, lambda: store.redis.lrange(key, offset, offset + limit - 1), []):
        try:
            entry = json.loads(raw)
        except ValueError:
            entry = None
        found.append(entry if isinstance(entry, dict) else
                     {"at": None, "label": "?", "action": "unreadable entry",
                      "target": text(raw)[:200], "result": {}})
    return found


def size(store: Store) -> int:
    key = audit_key(store)
    return int(read(key, lambda: store.redis.llen(key), 0))
