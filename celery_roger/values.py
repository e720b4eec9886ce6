"""Reading values roger wrote, which nothing trusts: each helper returns the value if it
has the type roger writes, else None (or an empty value). Pure; no Redis."""

from __future__ import annotations

import math
from typing import Any

#: Times past this (Unix seconds, year 9999) are not times.
MAX_TIME = 253402300799.0


def field_name(name: Any) -> Any:
    """A hash field as read, for the quarantine: text, or its bytes if they are not
    UTF-8 (so the value moved aside is the one read)."""
    if isinstance(name, bytes):
        try:
            return name.decode("utf-8")
        except UnicodeDecodeError:
            return name
    return str(name)


def as_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def as_key_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def as_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def as_count(value: Any) -> int | None:
    """A count >= 0 (an integral float is accepted)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not math.isfinite(value) or value < 0 or value != int(value):
        return None
    return int(value)


def as_time(value: Any) -> float | None:
    """A Unix time in seconds, if ``value`` is a sane one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not math.isfinite(value) or not 0 <= value <= MAX_TIME:
        return None
    return float(value)


def as_time_ms(score: Any) -> float | None:
    """A time in ms of Redis's clock (a sorted set's score), as Unix seconds."""
    return as_time(score / 1000) if isinstance(score, (int, float)) else None
