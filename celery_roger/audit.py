"""The console's audit log: every action taken through the dashboard (who, what, on what,
when, with what result), newest first, in a bounded Redis list (``audit``)."""

from __future__ import annotations

import json
import time
from typing import Any

from .records import text
from .store import Store
from .store_reads import read

#: How many entries the audit log keeps (the oldest go first): about 200 bytes each.
AUDIT_MAX = 10_000


def audit_key(store: Store) -> str:
    return store.prefix + "audit"


def record(store: Store, label: str, action: str, target: str,
           result: dict[str, Any] | None = None) -> None:
    """Append one entry: ``label`` (whose token), ``action``, ``target``, ``result``."""
    entry = json.dumps({"at": time.time(), "label": label, "action": action,
                        "target": target, "result": result or {}}, default=str)
    key = audit_key(store)
    pipe = store.redis.pipeline(transaction=True)
    pipe.lpush(key, entry)
    pipe.ltrim(key, 0, AUDIT_MAX - 1)
    pipe.execute()


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
