"""When a published job expires, read as Celery reads its ``expires`` (publish.py)."""

from __future__ import annotations

import datetime
import inspect
import math
import numbers
from typing import Any

from celery import Celery
from celery.utils.time import maybe_make_aware
from dateutil.parser import isoparse

#: Celery 5.7+ applies a registered task's own options (``expires`` among them) to a
#: publish by name that omits them (its ``send_task`` tells an omitted option from None).
_SEND_TASK_APPLIES_TASK_OPTIONS = \
    inspect.signature(Celery.send_task).parameters["expires"].default is not None


def expires_option(task: Any, options: dict[str, Any]) -> Any:
    """The ``expires`` Celery publishes the job with: the call's, else (a publish by name,
    on a Celery that applies a registered task's options then) the task's own."""
    if "expires" in options:
        return options["expires"]
    if _SEND_TASK_APPLIES_TASK_OPTIONS and options.get("task_type") is None:
        return getattr(task, "expires", None)
    return None


def expires_in(app: Celery, expires: Any, name: str = "") -> float | None:
    """Seconds from now until a job's ``expires``, read as Celery reads it, or None.

    ``expires`` is seconds (a number), a ``datetime`` or an ISO 8601 string; a naive
    datetime (or string without an offset) is UTC, as for Celery (which compares it with
    the UTC time, and whose worker reads it as UTC). Anything else, a number that is not
    finite, or a time out of ``datetime``'s range raises ValueError naming ``expires``.
    """
    if expires is None:
        return None
    what = f"{name}: expires" if name else "expires"
    if isinstance(expires, numbers.Real) and not isinstance(expires, bool):
        seconds = float(expires)
        if not math.isfinite(seconds):
            raise ValueError(f"{what} must be a finite number of seconds, got {expires!r}")
        try:
            app.now() + datetime.timedelta(seconds=seconds)
        except OverflowError:
            raise ValueError(f"{what} is out of range: {expires!r}") from None
        return seconds
    if isinstance(expires, str):
        try:
            when = isoparse(expires)
        except (ValueError, OverflowError) as exc:
            raise ValueError(
                f"{what} is not an ISO 8601 date and time: {expires!r} ({exc})"
            ) from None
    elif isinstance(expires, datetime.datetime):
        when = expires
    else:
        raise ValueError(
            f"{what} must be seconds (a number), a datetime or an ISO 8601 string, got "
            f"{type(expires).__name__} {expires!r}"
        )
    return (maybe_make_aware(when) - app.now()).total_seconds()
