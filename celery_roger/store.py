"""All roger state in Redis: one method, one round trip, per transition.

Every key lives under ``roger:{<partition>}:``. The braces are a Redis Cluster hash
tag: all state of one partition sits in one slot, so each Lua script touches one slot.
See docs/design.md for the layout and the life of a job.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis
from kombu.utils import json as kombu_json

from .config import Settings, redact_url

logger = logging.getLogger("celery_roger")

_SCRIPTS = ("take_queue_key", "confirm_queue_key", "release_queue_key", "admit", "finish",
            "tick", "drop_parked", "schedule_retry", "confirm_retries", "bury", "requeue_take",
            "unbury", "purge_buried", "start", "claim_cancel", "cancel", "park_paused",
            "resume", "take_due")


def _load_scripts() -> dict[str, str]:
    """Each script's source, with the shared functions of lib.lua in front of it."""
    lua = resources.files("celery_roger").joinpath("lua")
    lib = lua.joinpath("lib.lua").read_text(encoding="utf-8")
    return {name: lib + "\n" + lua.joinpath(f"{name}.lua").read_text(encoding="utf-8")
            for name in _SCRIPTS}


_SOURCES = _load_scripts()


@dataclass(frozen=True)
class Admission:
    """What admit decided: ``"run"`` or ``"parked"`` (with position and holder)."""

    outcome: str  # "run", "parked", "cancelled" (position: 1 to report it) or "paused"
    position: int = 0
    holder: str = ""
    #: A redelivered job's earlier attempt, whose worker died: to report as crashed.
    crashed: dict[str, Any] | None = None


@dataclass(frozen=True)
class Promotion:
    """A parked job that was handed its execution key and must now be published."""

    job_id: str
    message: dict[str, Any]


@dataclass(frozen=True)
class Finish:
    """What finish did: ``was_running`` is true for exactly one caller per attempt."""

    was_running: bool
    promotion: Promotion | None


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


class Store:
    """Roger state of one partition in one Redis."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.partition = settings.partition
        self.prefix = f"roger:{{{settings.partition}}}:"
        if settings.redis_client is not None:
            # Sentinel or Cluster: the user's own client (every script's keys share the
            # partition's hash tag, so each script runs on one Cluster slot).
            self.redis = settings.redis_client()
        else:
            self.redis = redis.Redis.from_url(
                settings.redis_url,
                socket_timeout=5,
                socket_connect_timeout=5,
                health_check_interval=30,
                retry_on_timeout=False,
            )
        self._scripts = {name: self.redis.register_script(src) for name, src in _SOURCES.items()}
        self.lease_ms = int(settings.lease_seconds * 1000)
        self.grace_ms = int(settings.publish_grace_seconds * 1000)
        k = self.prefix
        self.k_workers, self.k_running, self.k_held = k + "workers", k + "running", k + "held"
        self.k_msg, self.k_promoting = k + "msg", k + "promoting"
        self.k_qkeys, self.k_qk_pending = k + "qkeys", k + "qk_pending"
        self.k_retry, self.k_retry_msg = k + "retry", k + "retry_msg"
        self.k_buried, self.k_buried_msg = k + "buried", k + "buried_msg"
        self.k_buried_dropped, self.k_buried_queues = k + "buried_dropped", k + "buried_queues"
        self.k_cancelled, self.k_cancel_reported = k + "cancelled", k + "cancel_reported"
        self.k_cancel_reports = k + "cancel_reports"
        self.k_paused, self.k_paused_msg, self.k_paused_lists = (
            k + "paused", k + "paused_msg", k + "paused_lists")
        self.k_parked_count, self.k_stats = k + "parked_count", k + "stats"
        self.k_crash_checks, self.k_crash_info = k + "crash_checks", k + "crash_info"
        self.cancel_ttl_ms = int(settings.cancel_ttl * 1000)

    def __repr__(self) -> str:
        return f"<Store {redact_url(self.settings.redis_url)} partition={self.partition!r}>"

    def parked_key(self, execution_key: str) -> str:
        return f"{self.prefix}parked:{execution_key}"

    def paused_jobs_key(self, queue: str) -> str:
        return f"{self.prefix}pausedjobs:{queue}"

    def buried_key(self, queue: str) -> str:
        return f"{self.prefix}buried:{queue}"

    # -- publish ---------------------------------------------------------------------

    def take_queue_key(self, queue_key: str, job_id: str) -> str | None:
        """Take ``queue_key`` for ``job_id``; returns the holder's id if it is taken."""
        holder = self._scripts["take_queue_key"](
            keys=[self.k_qkeys, self.k_qk_pending, self.k_stats],
            args=[queue_key, job_id, self.grace_ms],
        )
        return _text(holder) if holder else None

    def confirm_queue_key(self, queue_key: str, job_id: str,
                          expires_in: float | None = None) -> bool:
        """The job is in the broker. With ``expires_in`` (its expiry, in seconds), the key
        frees itself that long plus the grace later unless a worker admits the job."""
        deadline = 0 if expires_in is None else int(max(expires_in, 0) * 1000) + self.grace_ms
        return bool(
            self._scripts["confirm_queue_key"](
                keys=[self.k_qkeys, self.k_qk_pending], args=[queue_key, job_id, deadline]
            )
        )

    def release_queue_key(self, queue_key: str, job_id: str = "") -> str | None:
        """Release ``queue_key`` if ``job_id`` holds it (anyone's when ``job_id`` is '')."""
        holder = self._scripts["release_queue_key"](
            keys=[self.k_qkeys, self.k_qk_pending], args=[queue_key, job_id]
        )
        return _text(holder) if holder else None

    # -- worker ----------------------------------------------------------------------

    def admit(
        self, job_id: str, *, instance: str, execution_key: str, info: dict[str, Any],
        message: dict[str, Any],
    ) -> Admission:
        reply = self._scripts["admit"](
            keys=[self.k_workers, self.k_running, self.k_held, self.k_msg, self.k_promoting,
                  self.parked_key(execution_key), self.k_cancelled, self.k_cancel_reported,
                  self.k_paused, self.k_parked_count, self.k_stats, self.k_qkeys,
                  self.k_qk_pending, self.k_crash_checks, self.k_crash_info],
            args=[job_id, instance, self.lease_ms, execution_key, _dumps(info),
                  _dumps(message) if execution_key else "", info.get("queue") or "",
                  info.get("qk") or ""],
        )
        outcome = _text(reply[0])
        if outcome == "parked":
            return Admission("parked", int(reply[1]), _text(reply[2]))
        if outcome == "cancelled":
            return Admission(outcome, position=int(reply[1]))
        if len(reply) > 1:
            return Admission(outcome, crashed=json.loads(reply[1]))
        return Admission(outcome)

    def redis_time_ms(self) -> float:
        seconds, micros = self.redis.time()
        return seconds * 1000 + micros / 1000

    def finish(
        self, job_id: str, *, execution_key: str = "", queue_key: str = "", force: bool = False
    ) -> Finish:
        """End a job's attempt: whether it was running, and the parked job promoted."""
        reply = self._scripts["finish"](
            keys=[self.k_running, self.k_held, self.k_msg, self.k_promoting, self.k_qkeys,
                  self.k_qk_pending, self.parked_key(execution_key), self.k_parked_count],
            args=[job_id, execution_key, queue_key, self.grace_ms, "1" if force else "0"],
        )
        promotion = Promotion(_text(reply[1]), json.loads(reply[2])) if len(reply) > 1 else None
        return Finish(bool(int(reply[0])), promotion)

    def confirm_promoted(self, job_id: str) -> None:
        """The promoted job's message is in the broker: it no longer needs republishing."""
        self.redis.zrem(self.k_promoting, job_id)

    def tick(self, instance: str = "", *, deregister: bool = False) -> TickResult:
        (orphans, republish, freed, due, next_due, reports, paused, stale,
         crashed) = self._scripts["tick"](
            keys=[self.k_workers, self.k_running, self.k_promoting, self.k_msg, self.k_qkeys,
                  self.k_qk_pending, self.k_retry, self.k_retry_msg, self.k_cancelled,
                  self.k_cancel_reported, self.k_cancel_reports, self.k_paused,
                  self.k_paused_lists, self.k_crash_checks, self.k_crash_info],
            args=[instance, self.lease_ms, self.grace_ms, "1" if deregister else "0"],
        )
        return TickResult(
            orphans=[json.loads(o) for o in orphans],
            republish=[
                Promotion(_text(republish[i]), json.loads(republish[i + 1]))
                for i in range(0, len(republish), 2)
            ],
            freed_queue_keys=[_text(k) for k in freed],
            due_retries=_due(due),
            next_retry_in=None if int(next_due) < 0 else int(next_due) / 1000,
            cancel_reports=[loads(report) for report in reports],
            paused={_text(q) for q in paused},
            stale_paused=[_text(q) for q in stale],
            crashed=[json.loads(c) for c in crashed],
        )

    def take_due(self, limit: int = 100) -> list[DueRetry]:
        return _due(self._scripts["take_due"](keys=[self.k_retry, self.k_retry_msg],
                                              args=[self.grace_ms, limit]))

    # -- cancellation and pause ---------------------------------------------------------

    def start(self, job_id: str, queue: str, info: dict[str, Any] | None = None,
              instance: str = "", queue_key: str = "",
              ) -> tuple[str, bool, dict[str, Any] | None]:
        """The check right before a job's body runs, and the admission of a job without
        an execution key (``info``): (outcome, report its cancel, crashed earlier attempt).
        """
        reply = self._scripts["start"](
            keys=[self.k_cancelled, self.k_cancel_reported, self.k_paused, self.k_stats,
                  self.k_workers, self.k_running, self.k_crash_checks, self.k_crash_info,
                  self.k_qkeys, self.k_qk_pending],
            args=[job_id, queue, _dumps(info) if info else "", instance, queue_key])
        outcome = _text(reply[0])
        if outcome == "cancelled":
            return outcome, bool(int(reply[1])), None
        return outcome, False, json.loads(reply[1]) if len(reply) > 1 else None

    def claim_cancel(self, job_id: str) -> bool:
        """Remember ``job_id`` as cancelled; true for the one caller that reports it."""
        return bool(self._scripts["claim_cancel"](
            keys=[self.k_cancelled, self.k_cancel_reported, self.k_stats],
            args=[job_id, self.cancel_ttl_ms]))

    def cancel(self, job_id: str) -> tuple[dict[str, Any] | None, str]:
        """Cancel: (its running record or None, where it waited in Redis or '')."""
        running, where = self._scripts["cancel"](
            keys=[self.k_cancelled, self.k_cancel_reported, self.k_cancel_reports,
                  self.k_retry, self.k_retry_msg, self.k_msg, self.k_promoting,
                  self.k_paused_msg, self.k_qkeys, self.k_qk_pending, self.k_running,
                  self.k_parked_count, self.k_stats],
            args=[job_id, self.cancel_ttl_ms, self.prefix],
        )
        return (json.loads(running) if running else None), _text(where)

    def running_on(self, instance: str) -> dict[str, dict[str, Any]]:
        """The attempts recorded as running under one worker instance."""
        found = {}
        for job_id, raw in self.redis.hgetall(self.k_running).items():
            try:
                info = json.loads(raw)
            except ValueError:
                continue
            if isinstance(info, dict) and info.get("instance") == instance:
                found[_text(job_id)] = info
        return found

    def stats(self) -> dict[str, int]:
        """Counters: ``dedup_refused``, ``cancelled``."""
        return {_text(k): int(v) for k, v in self.redis.hgetall(self.k_stats).items()}

    def is_cancelled(self, job_id: str) -> bool:
        expiry = self.redis.zscore(self.k_cancelled, job_id)
        return expiry is not None and expiry > self.redis_time_ms()

    def pending_cancels(self) -> int:
        return int(self.redis.zcard(self.k_cancelled))

    def pause(self, queue: str, reason: str | None) -> None:
        seconds, micros = self.redis.time()
        self.redis.hset(self.k_paused, queue,
                        _dumps({"at": seconds + micros / 1e6, "reason": reason}))

    def paused(self) -> dict[str, dict[str, Any]]:
        return {_text(q): json.loads(v) for q, v in self.redis.hgetall(self.k_paused).items()}

    def park_paused(self, job_id: str, queue: str, stored: dict[str, Any]) -> None:
        self._scripts["park_paused"](
            keys=[self.k_paused_msg, self.paused_jobs_key(queue), self.k_paused_lists],
            args=[job_id, dumps({**stored, "queue": queue}), queue],
        )

    def resume(self, queue: str, *, release_only: bool = False) -> int:
        """Forget the pause of ``queue`` and make its held jobs due now; returns how many."""
        return int(self._scripts["resume"](
            keys=[self.k_paused, self.paused_jobs_key(queue), self.k_paused_msg, self.k_retry,
                  self.k_retry_msg, self.k_paused_lists],
            args=[queue, "0" if release_only else "1"],
        ))

    def held_for_pause(self, queue: str) -> int:
        return int(self.redis.llen(self.paused_jobs_key(queue)))

    # -- retries and the buried queue -------------------------------------------------

    def schedule_retry(self, job_id: str, delay: float, entry: dict[str, Any]) -> bool:
        """Keep a retry until it is due; false (nothing kept) if the job is cancelled."""
        return bool(self._scripts["schedule_retry"](
            keys=[self.k_retry, self.k_retry_msg, self.k_cancelled],
            args=[job_id, int(delay * 1000), dumps(entry)],
        ))

    def confirm_retries(self, published: list[DueRetry]) -> None:
        if published:
            self._scripts["confirm_retries"](
                keys=[self.k_retry, self.k_retry_msg],
                args=[x for due in published for x in (due.job_id, due.score)],
            )

    def retry_due_at(self, job_id: str) -> float | None:
        """When a waiting retry of ``job_id`` is due (Unix seconds), or None."""
        score = self.redis.zscore(self.k_retry, job_id)
        return None if score is None else score / 1000

    def bury(self, job_id: str, queue: str, entry: dict[str, Any]) -> list[str]:
        """Keep a buried job's entry; returns the ids dropped to respect the cap."""
        dropped = self._scripts["bury"](
            keys=[self.k_buried, self.buried_key(queue), self.k_buried_msg,
                  self.k_buried_dropped, self.k_buried_queues],
            args=[job_id, dumps(entry), self.settings.buried_max, queue],
        )
        return [_text(d) for d in dropped]

    def buried(self, queue: str | None, offset: int, limit: int) -> list[dict[str, Any]]:
        """Buried entries, newest first."""
        zset = self.k_buried if queue is None else self.buried_key(queue)
        ids: list[Any] = list(self.redis.zrevrange(zset, offset, offset + limit - 1))
        if not ids:
            return []
        return [loads(raw) for raw in self.redis.hmget(self.k_buried_msg, ids) if raw]

    def buried_ids(self, queue: str) -> list[str]:
        return [_text(j) for j in self.redis.zrevrange(self.buried_key(queue), 0, -1)]

    def buried_entry(self, job_id: str) -> dict[str, Any] | None:
        raw = self.redis.hget(self.k_buried_msg, job_id)
        return None if raw is None else loads(raw)

    def buried_dropped(self) -> dict[str, int]:
        return {_text(q): int(n) for q, n in self.redis.hgetall(self.k_buried_dropped).items()}

    def buried_queues(self) -> list[str]:
        return sorted(_text(q) for q in self.redis.smembers(self.k_buried_queues))

    def requeue_take(self, job_id: str) -> tuple[str, Any]:
        """('missing', None), ('held', holder id) or ('ok', entry)."""
        reply = self._scripts["requeue_take"](
            keys=[self.k_buried_msg, self.k_qkeys, self.k_qk_pending],
            args=[job_id, self.grace_ms],
        )
        outcome = _text(reply[0])
        if outcome == "ok":
            return outcome, loads(reply[1])
        return outcome, _text(reply[1]) if len(reply) > 1 else None

    def unbury(self, job_id: str, queue: str, queue_key: str = "") -> bool:
        return bool(self._scripts["unbury"](
            keys=[self.k_buried, self.buried_key(queue), self.k_buried_msg, self.k_qkeys,
                  self.k_qk_pending],
            args=[job_id, queue_key],
        ))

    def purge_buried(self, queue: str) -> int:
        return int(self._scripts["purge_buried"](
            keys=[self.k_buried, self.buried_key(queue), self.k_buried_msg,
                  self.k_buried_queues],
            args=[queue],
        ))

    # -- operator actions ------------------------------------------------------------

    def drop_parked(self, job_id: str, *, execution_key: str, queue_key: str = "",
                    queue: str = "") -> bool:
        return bool(
            self._scripts["drop_parked"](
                keys=[self.parked_key(execution_key), self.k_msg, self.k_qkeys, self.k_qk_pending,
                      self.k_parked_count],
                args=[job_id, queue_key, queue],
            )
        )

    def parked_messages(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every stored message of a parked or promoted job (HSCAN: operator use only)."""
        for job_id, raw in self.redis.hscan_iter(self.k_msg, count=500):
            yield _text(job_id), json.loads(raw)

    def queue_key_holder(self, queue_key: str) -> str | None:
        holder = self.redis.hget(self.k_qkeys, queue_key)
        return _text(holder) if holder else None

    def execution_key_holder(self, execution_key: str) -> str | None:
        holder = self.redis.hget(self.k_held, execution_key)
        return _text(holder) if holder else None

    def parked_ids(self, execution_key: str) -> list[str]:
        return [_text(j) for j in self.redis.lrange(self.parked_key(execution_key), 0, -1)]


def _due(reply: list[Any]) -> list[DueRetry]:
    return [DueRetry(_text(reply[i]), loads(reply[i + 1]), _text(reply[i + 2]))
            for i in range(0, len(reply), 3)]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def dumps(value: Any) -> str:
    """JSON for entries holding job arguments (kombu's encoder: dates, UUIDs, decimals)."""
    return kombu_json.dumps(value)


def loads(raw: Any) -> Any:
    return kombu_json.loads(raw)
