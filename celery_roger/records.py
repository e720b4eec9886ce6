"""What roger's Redis layer returns: typed results of the Lua scripts, and the JSON
helpers every reader of stored values uses."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from kombu.utils import json as kombu_json

logger = logging.getLogger("celery_roger")


@dataclass(frozen=True)
class AdmitOutcome:
    """What admit decided: ``"run"`` or ``"parked"`` (with position and holder)."""

    #: "run", "parked" (behind an execution key's holders), "ratewait" (on its rate
    #: key's line), "qkwait" (for its queue key, on_duplicate="replace"), "cancelled"
    #: (position: 1 to report it), "paused", or "nolease"
    #: (this worker's lease has run out: admit the job again later)
    outcome: str
    position: int = 0
    holder: str = ""
    #: A redelivered job's earlier attempt, whose worker died: to report as crashed.
    crashed: dict[str, Any] | None = None
    #: "ratewait": seconds until its rate's window may open
    opens_in: float = 0.0
    #: "ratewait": the job handed the execution slot this one gave up, to send
    promotion: Promotion | None = None


@dataclass(frozen=True)
class Promotion:
    """A parked job that was handed its execution key and must now be published."""

    job_id: str
    message: dict[str, Any]
    #: finish.lua pushed it to its broker list itself: nothing to publish or confirm
    pushed: bool = False


@dataclass(frozen=True)
class Finish:
    """What finish did: ``was_running`` is true for exactly one caller per attempt."""

    was_running: bool
    promotion: Promotion | None
    #: on_duplicate="replace": the job that waited for the queue key, handed it now
    queue_promotion: Promotion | None = None


@dataclass(frozen=True)
class DueRetry:
    """A retry whose time has come: publish ``entry``, then confirm it with ``score``."""

    job_id: str
    entry: dict[str, Any]
    score: str


@dataclass(frozen=True)
class TickResult:
    orphans: list[dict[str, Any]]
    republish: list[Promotion]
    freed_queue_keys: list[str]
    due_retries: list[DueRetry]
    #: Seconds until the next waiting retry is due; None when none waits.
    next_retry_in: float | None
    #: Cancelled jobs taken out of Redis waiting places, to report (on_cancel) once.
    cancel_reports: list[dict[str, Any]]
    paused: set[str]
    #: Queues no longer paused that still have held jobs (a late park): to release.
    stale_paused: list[str]
    #: Earlier attempts of redelivered jobs, whose worker has now died: to report.
    crashed: list[dict[str, Any]]
    #: Values moved aside since the last tick (anywhere in the cluster): to log once.
    quarantined: list[dict[str, Any]]
    #: Rate keys whose line may move now: run rate_wake for each.
    rate_keys: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RateWake:
    """What moving a rate key's line did: the jobs sent on, and when to look again
    (seconds; None when the line is empty)."""

    promotions: list[Promotion]
    next_in: float | None


def objects(replies: list[Any], *, kombu: bool = False) -> list[dict[str, Any]]:
    """JSON objects returned by a script (checked there); anything unreadable is logged
    and left out."""
    found = []
    for raw in replies:
        if isinstance(raw, bytes):
            raw = raw.decode("utf-8", "replace")
        try:
            value = kombu_loads(raw) if kombu else json.loads(raw)
        except Exception as exc:
            logger.error("roger: left out an unreadable value (%s): %s", exc, preview(raw))
            continue
        if isinstance(value, dict):
            found.append(value)
    return found


def preview(raw: Any, limit: int = 120) -> str:
    """A short, printable rendering of a stored value, for a log line."""
    shown = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    return repr(shown if len(shown) <= limit else shown[:limit] + "...")


def text(value: Any) -> str:
    """A Redis reply as text."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def compact(value: Any) -> str:
    """Compact JSON for values the scripts read (no arguments of a job: see ``dumps``)."""
    return json.dumps(value, separators=(",", ":"))


def dumps(value: Any) -> str:
    """JSON for entries holding job arguments (kombu's encoder: dates, UUIDs, decimals)."""
    return kombu_json.dumps(value)


def kombu_loads(raw: Any) -> Any:
    """JSON as kombu reads it (dates, UUIDs, decimals: what ``dumps`` wrote)."""
    return kombu_json.loads(raw)


#: The shapes of a job roger keeps in Redis (``StoredJob.kind``).
STORED_KINDS = ("message", "entry", "buried")


@dataclass(frozen=True)
class StoredJob:
    """A job roger keeps in Redis, in one of three shapes, told by its ``kind`` field
    (written since 0.2; a value written before is told by its fields):

    * ``"message"``: a captured broker message (``body``, ``headers``, ``properties``,
      ``exchange``, ``routing_key``; a parked one on a Redis broker that is roger's
      database also its ``kombu_payload`` and ``kombu_list``, for finish.lua to push back
      when it is promoted): parked and promoted jobs (``msg``), and jobs held
      for a paused queue when the worker's main process held them (``{"raw": message}``);
    * ``"entry"``: a publish entry (``task``, ``args``, ``kwargs``, ``options``): retries,
      and jobs held for a paused queue by their own process;
    * ``"buried"``: a buried job (``task``, ``args``, ``kwargs``, ``queue``, the keys,
      ``retry_count``, ``error``, ``traceback``, ``buried_at``, and its publish entry as
      ``publish``).
    """

    kind: str
    value: dict[str, Any]

    @classmethod
    def of(cls, value: dict[str, Any]) -> StoredJob:
        kind = value.get("kind")
        if kind not in STORED_KINDS:
            if "raw" in value or "body" in value:
                kind = "message"
            elif "publish" in value and "error" in value:
                kind = "buried"
            else:
                kind = "entry"
        return cls(kind, value)

    @property
    def message(self) -> dict[str, Any] | None:
        """The captured message of a ``"message"`` job."""
        if self.kind != "message":
            return None
        raw = self.value.get("raw", self.value)
        return raw if isinstance(raw, dict) else None

    @property
    def entry(self) -> dict[str, Any] | None:
        """The publish entry of an ``"entry"`` or ``"buried"`` job."""
        entry = self.value.get("publish") if self.kind == "buried" else \
            self.value if self.kind == "entry" else None
        return entry if isinstance(entry, dict) else None

    @property
    def headers(self) -> dict[str, Any]:
        """Its message headers (the ``roger`` header among them), whatever its shape."""
        message, entry = self.message, self.entry
        if message is not None:
            headers = message.get("headers")
        else:
            options = (entry or {}).get("options")
            headers = options.get("headers") if isinstance(options, dict) else None
        return headers if isinstance(headers, dict) else {}

