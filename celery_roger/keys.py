"""Resolving and validating queue keys and execution keys."""

from __future__ import annotations

from typing import Any

MAX_KEY_BYTES = 1024

KINDS = ("queue_key", "execution_key")


def compute(spec: Any, args: tuple, kwargs: dict) -> Any:
    """The key a task option or per-call value ``spec`` gives a job with these arguments."""
    return spec(*args, **kwargs) if callable(spec) else spec


def validate(task_name: str, kind: str, value: Any) -> str | None:
    """``value`` if it is a valid key (or None); else a TypeError/ValueError naming both."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(
            f"{task_name}: {kind} must be a str or None, got {type(value).__name__} {value!r}"
        )
    if not value:
        raise ValueError(f"{task_name}: {kind} must not be an empty string")
    size = len(value.encode("utf-8", errors="surrogatepass"))
    if size > MAX_KEY_BYTES:
        raise ValueError(
            f"{task_name}: {kind} is {size} bytes of UTF-8, more than the {MAX_KEY_BYTES} allowed"
            f" ({value[:40]!r}...)"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{task_name}: {kind} is not valid UTF-8 text ({exc.reason})") from None
    return value
