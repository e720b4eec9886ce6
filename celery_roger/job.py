"""``Job`` and ``BuriedJob``: roger's read-only view of a job."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from kombu.utils import json as kombu_json

from .values import as_key_or_none

#: The message header roger adds at publish: {"q": queue, "at": publish time, "p": roger
#: partition, "qk": queue key, "ek": execution key, "rc": retry count, "qu": "start" for
#: queue_key_until="start", "el": execution_limit above 1, "rk": rate key, "rl": its rate
#: as [starts, window ms], "qd": "replace" for on_duplicate="replace"}. Only roger writes
#: it: a caller's own ``roger`` header is replaced at publish. A worker refuses a job whose
#: ``p`` names another partition than its own (a job without ``p`` runs anywhere).
HEADER = "roger"

#: A job that starts within this many seconds of its admission skips the start check
#: (nothing it checks can have changed unseen: pause() and cancel() wait this long, and a
#: cancel kills such a job as it starts). Later starts check again.
FRESH_ADMISSION_SECONDS = 0.05


def job_header(request: Any) -> dict[str, Any]:
    """The ``roger`` header of a request dict, Context or message headers ({} if absent)."""
    job = request.get(HEADER) if isinstance(request, dict) else getattr(request, HEADER, None)
    return job if isinstance(job, dict) else {}


def header_problem(request: Any) -> str | None:
    """What is wrong with the ``roger`` header of a request dict (None: absent or sound).

    Roger ignores what is wrong (a header that is not a mapping, fields of the wrong type)
    and treats it as absent; this says what, for a warning.
    """
    job = request.get(HEADER) if isinstance(request, dict) else None
    if job is None:
        return None
    if not isinstance(job, dict):
        return f"not a mapping but {type(job).__name__} {_preview(job)}"
    wrong = [f"{name}={_preview(value)}" for name, value in job.items()
             if value is not None and not _sound_field(name, value)]
    return f"fields of the wrong type: {', '.join(wrong)}" if wrong else None


def job_partition(request: Any) -> str | None:
    """The roger partition a job was published in (``p`` of its header), or None when its
    header does not say (a job published by an older version, or a malformed field)."""
    partition = job_header(request).get("p")
    return partition if isinstance(partition, str) and partition else None


def header_limit(header: dict[str, Any]) -> int:
    """The execution limit a job was published with (``el``; 1 when absent or unsound)."""
    value = header.get("el")
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 \
        else 1


def header_rate(header: dict[str, Any]) -> tuple[str, int, int] | None:
    """(rate key, starts, window ms) a job was published with, or None (absent, unsound)."""
    key, limit = header.get("rk"), header.get("rl")
    if not isinstance(key, str) or not key or not isinstance(limit, list) or len(limit) != 2:
        return None
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in limit):
        return None
    return key, limit[0], limit[1]


def _sound_field(name: str, value: Any) -> bool:
    if name == "rk":
        return isinstance(value, str)
    if name == "rl":
        return header_rate({"rk": "k", "rl": value}) is not None
    if name in ("q", "qk", "ek", "p"):
        return isinstance(value, str)
    if name == "qu":
        return value == "start"
    if name == "qd":
        return value == "replace"
    if name == "el":
        return header_limit({"el": value}) == value
    if name == "at":
        return finite(value) is not None
    if name == "rc":
        return _count(value) is not None
    return True


def _preview(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


MAX_RECORDED_ARGS = 8192


def small_arguments(args: Any, kwargs: Any) -> dict[str, Any]:
    """A running job's args and kwargs, for its record in Redis (omitted when large)."""
    try:
        raw = kombu_json.dumps([args, kwargs])
    except Exception:
        return {}
    if len(raw) > MAX_RECORDED_ARGS:
        return {}
    args, kwargs = json.loads(raw)
    return {"args": args, "kwargs": kwargs}


def as_key(value: Any) -> str:
    """A stored key as a string: '' for none (or for anything that is not a string)."""
    return value if isinstance(value, str) else ""


def job_keys(request: Any) -> tuple[str, str]:
    """(execution key, queue key) a job was published with; '' for none."""
    job = job_header(request)
    return as_key(job.get("ek")), as_key(job.get("qk"))


def is_roger_task(task: Any) -> bool:
    """Whether ``task`` is a ``RogerTask`` (which sets ``roger_task``), without importing
    the task module: the layers below the task read this."""
    return getattr(task, "roger_task", False) is True


def finite(value: Any) -> float | None:
    """``value`` as a float if it is a finite number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value):
        return None
    return float(value)


def _count(value: Any) -> int | None:
    """A retry count: an integer >= 0 (a float with no fraction is accepted)."""
    number = finite(value)
    return int(number) if number is not None and number >= 0 and number == int(number) \
        else None


@dataclass(frozen=True)
class Job:
    """What callbacks and inspection see of a job. Times are Unix timestamps (seconds)."""

    id: str
    task: str
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    queue: str = ""
    queue_key: str | None = None
    execution_key: str | None = None
    retry_count: int = 0
    queued_at: float = 0.0
    started_at: float = 0.0
    #: queue_key_until="start": the queue key goes as the attempt starts
    queue_key_at_start: bool = False
    #: how many jobs of its execution key may run at once (execution_limit)
    execution_limit: int = 1
    #: its rate key and rate as (starts, window ms), if it has a rate
    rate_key: str | None = None
    rate: tuple[int, int] | None = None
    #: on_duplicate="replace": it waits for its queue key behind a running holder
    replaces: bool = False

    @property
    def admitted_by_worker(self) -> bool:
        """Whether its worker's main process admits it (admission.py): a job that may have
        to wait, on an execution key or a rate. Others are admitted as they start."""
        return self.execution_key is not None or self.rate_key is not None or self.replaces

    def header(self, retry_count: int, partition: str | None = None) -> dict[str, Any]:
        """This job's ``roger`` header, for publishing it again with ``retry_count`` in
        ``partition`` (the partition of the worker that runs it)."""
        header: dict[str, Any] = {"q": self.queue, "at": self.queued_at, "rc": retry_count}
        if partition:
            header["p"] = partition
        if self.queue_key:
            header["qk"] = self.queue_key
            if self.queue_key_at_start:
                header["qu"] = "start"
            if self.replaces:
                header["qd"] = "replace"
        if self.execution_key:
            header["ek"] = self.execution_key
            if self.execution_limit > 1:
                header["el"] = self.execution_limit
        if self.rate_key and self.rate:
            header["rk"], header["rl"] = self.rate_key, list(self.rate)
        return header

    @classmethod
    def from_header(cls, job_id: str, task: str, args: Any, kwargs: Any,
                    header: dict[str, Any], *, queue: str = "",
                    started_at: float | None = None) -> Job:
        q = header.get("q")
        rated = header_rate(header)
        return cls(
            id=job_id, task=task, args=tuple(args or ()), kwargs=dict(kwargs or {}),
            queue=q if isinstance(q, str) and q else queue,
            queue_key=as_key_or_none(header.get("qk")),
            execution_key=as_key_or_none(header.get("ek")),
            retry_count=_count(header.get("rc")) or 0, queued_at=finite(header.get("at")) or 0.0,
            started_at=time.time() if started_at is None else started_at,
            queue_key_at_start=header.get("qu") == "start",
            execution_limit=header_limit(header),
            rate_key=rated[0] if rated else None, rate=rated[1:] if rated else None,
            replaces=header.get("qd") == "replace",
        )

    @classmethod
    def from_request(cls, request: Any, *, started_at: float | None = None) -> Job:
        """From a task's ``self.request`` (job process) or a worker ``Request`` (main)."""
        delivery = getattr(request, "delivery_info", None) or {}
        headers = getattr(request, "request_dict", None)
        return cls.from_header(
            str(request.id), str(getattr(request, "name", None) or getattr(request, "task", "")),
            request.args, request.kwargs,
            job_header(headers if isinstance(headers, dict) else request),
            queue=str(delivery.get("routing_key") or ""), started_at=started_at,
        )


@dataclass(frozen=True)
class BuriedJob:
    """A job that exhausted its retries. ``error`` is ``"Type: message"``."""

    id: str
    task: str
    args: tuple
    kwargs: dict[str, Any]
    queue: str
    queue_key: str | None
    execution_key: str | None
    retry_count: int
    error: str
    traceback: str | None
    buried_at: float
    error_type: str = ""

    @classmethod
    def from_entry(cls, entry: dict[str, Any]) -> BuriedJob:
        return cls(
            id=entry["id"], task=entry["task"], args=tuple(entry.get("args") or ()),
            kwargs=dict(entry.get("kwargs") or {}), queue=entry.get("queue", ""),
            queue_key=as_key_or_none(entry.get("queue_key")),
            execution_key=as_key_or_none(entry.get("execution_key")),
            retry_count=int(entry.get("retry_count", 0)), error=entry.get("error", ""),
            traceback=entry.get("traceback"), buried_at=float(entry.get("buried_at", 0)),
            error_type=entry.get("error_type", ""),
        )
