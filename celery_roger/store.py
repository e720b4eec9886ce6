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

from .config import Settings, redact_url

logger = logging.getLogger("celery_roger")

_SCRIPTS = ("take_queue_key", "confirm_queue_key", "release_queue_key", "admit", "finish",
            "tick", "drop_parked")


def _load_scripts() -> dict[str, str]:
    lua = resources.files("celery_roger").joinpath("lua")
    return {name: lua.joinpath(f"{name}.lua").read_text(encoding="utf-8") for name in _SCRIPTS}


_SOURCES = _load_scripts()


@dataclass(frozen=True)
class Admission:
    """What admit decided: ``"run"`` or ``"parked"`` (with position and holder)."""

    outcome: str
    position: int = 0
    holder: str = ""


@dataclass(frozen=True)
class Promotion:
    """A parked job that was handed its execution key and must now be published."""

    job_id: str
    message: dict[str, Any]


@dataclass(frozen=True)
class TickResult:
    orphans: list[dict[str, Any]]
    republish: list[Promotion]
    freed_queue_keys: list[str]


class Store:
    """Roger state of one partition in one Redis."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.partition = settings.partition
        self.prefix = f"roger:{{{settings.partition}}}:"
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

    def __repr__(self) -> str:
        return f"<Store {redact_url(self.settings.redis_url)} partition={self.partition!r}>"

    def parked_key(self, execution_key: str) -> str:
        return f"{self.prefix}parked:{execution_key}"

    # -- publish ---------------------------------------------------------------------

    def take_queue_key(self, queue_key: str, job_id: str) -> str | None:
        """Take ``queue_key`` for ``job_id``; returns the holder's id if it is taken."""
        holder = self._scripts["take_queue_key"](
            keys=[self.k_qkeys, self.k_qk_pending], args=[queue_key, job_id, self.grace_ms]
        )
        return _text(holder) if holder else None

    def confirm_queue_key(self, queue_key: str, job_id: str) -> bool:
        return bool(
            self._scripts["confirm_queue_key"](
                keys=[self.k_qkeys, self.k_qk_pending], args=[queue_key, job_id]
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
                  self.parked_key(execution_key)],
            args=[job_id, instance, self.lease_ms, execution_key, _dumps(info),
                  _dumps(message) if execution_key else ""],
        )
        outcome = _text(reply[0])
        if outcome == "parked":
            return Admission("parked", int(reply[1]), _text(reply[2]))
        return Admission(outcome)

    def finish(
        self, job_id: str, *, execution_key: str = "", queue_key: str = "", force: bool = False
    ) -> Promotion | None:
        """End a job's attempt; returns the parked job that now holds the key, if any."""
        reply = self._scripts["finish"](
            keys=[self.k_running, self.k_held, self.k_msg, self.k_promoting, self.k_qkeys,
                  self.k_qk_pending, self.parked_key(execution_key)],
            args=[job_id, execution_key, queue_key, self.grace_ms, "1" if force else "0"],
        )
        if not reply:
            return None
        return Promotion(_text(reply[0]), json.loads(reply[1]))

    def confirm_promoted(self, job_id: str) -> None:
        """The promoted job's message is in the broker: it no longer needs republishing."""
        self.redis.zrem(self.k_promoting, job_id)

    def tick(self, instance: str = "", *, deregister: bool = False) -> TickResult:
        orphans, republish, freed = self._scripts["tick"](
            keys=[self.k_workers, self.k_running, self.k_promoting, self.k_msg, self.k_qkeys,
                  self.k_qk_pending],
            args=[instance, self.lease_ms, self.grace_ms, "1" if deregister else "0"],
        )
        return TickResult(
            orphans=[json.loads(o) for o in orphans],
            republish=[
                Promotion(_text(republish[i]), json.loads(republish[i + 1]))
                for i in range(0, len(republish), 2)
            ],
            freed_queue_keys=[_text(k) for k in freed],
        )

    # -- operator actions ------------------------------------------------------------

    def drop_parked(self, job_id: str, *, execution_key: str, queue_key: str = "") -> bool:
        return bool(
            self._scripts["drop_parked"](
                keys=[self.parked_key(execution_key), self.k_msg, self.k_qkeys, self.k_qk_pending],
                args=[job_id, queue_key],
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


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))
