"""All roger state in Redis: one method, one round trip, per transition.

``Store`` is the Redis layer's face: publish (queue keys), the worker's transitions (admit,
finish, lease, tick), the orphaned-key sweep here; retries and burial (store_failure.py),
cancellation, pause and operator actions (store_control.py) and the client, scripts and
key names (store_base.py) beside it. The results are typed (records.py).
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from .errors import OlderWorkersRunning
from .keys import base_key
from .records import (
    AdmitOutcome,
    DueRetry,
    Finish,
    Promotion,
    TickResult,
    compact,
    dumps,
    kombu_loads,
    objects,
    preview,
    text,
)
from .store_base import SCHEMA_VERSION
from .store_control import ControlStore
from .store_failure import FailureStore

logger = logging.getLogger("celery_roger")

__all__ = [
    "AdmitOutcome",
    "DueRetry",
    "Finish",
    "Promotion",
    "Store",
    "TickResult",
    "dumps",
    "kombu_loads",
    "preview",
    "text",
]


class Store(ControlStore, FailureStore):
    """Roger state of one partition in one Redis."""

    # -- publish ---------------------------------------------------------------------

    def take_queue_key(self, queue_key: str, job_id: str) -> str | None:
        """Take ``queue_key`` for ``job_id``; returns the holder's id if it is taken."""
        holder = self._run(
            "take_queue_key", dict(qkey=queue_key, job=job_id, grace_ms=self.grace_ms)
        )
        return text(holder) if holder else None

    def replace_take(self, queue_key: str, job_id: str) -> tuple[str, str]:
        """on_duplicate="replace", step 1 (replace_take.lua): ('took' | 'replacing' |
        'behind' | 'refused', the holder or '')."""
        reply = self._run("replace_take", dict(qkey=queue_key, job=job_id,
                                               grace_ms=self.grace_ms))
        return text(reply[0]), text(reply[1]) if len(reply) > 1 else ""

    def replace_done(self, queue_key: str, job_id: str, *, sent: bool, previous: str) -> bool:
        """on_duplicate="replace", step 2 (replace_done.lua): whether this job still
        holds the key (the replaced holder is then to be cancelled, when ``sent``)."""
        return bool(self._run("replace_done", dict(qkey=queue_key, job=job_id,
                                                   sent="1" if sent else "0",
                                                   previous=previous)))

    def confirm_queue_key(
        self, queue_key: str, job_id: str, expires_in: float | None = None, window: float = 0.0
    ) -> bool:
        """The job is in the broker. With ``expires_in`` (its expiry, in seconds), the key
        frees itself that long plus the grace later unless a worker admits the job. With
        ``window`` (seconds, queue_key_until), it stays taken at least that long."""
        deadline = self.queue_key_deadline_ms(expires_in)
        return bool(self._run("confirm_queue_key", dict(
            qkey=queue_key, job=job_id, deadline_ms=deadline, window_ms=int(window * 1000))))

    def fuse_token(self) -> str:
        """The token that proves a client reaches this partition's database (fuse.py),
        written first if missing."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(self.k_fuse, uuid.uuid4().hex, nx=True)
            pipe.get(self.k_fuse)
            _, token = pipe.execute()
        return text(token)

    def publish_fused(self, client: Any, queue_list: str, token: str, queue_key: str,
                      job_id: str, payload: str, deadline_ms: int,
                      window_ms: int = 0) -> list[Any]:
        """Take ``queue_key`` and push ``payload`` to the broker's ``queue_list`` in one
        script, through the broker's ``client`` (see publish_fused.lua for the answers)."""
        outcome = self._run(
            "publish_fused",
            dict(token=token, qkey=queue_key, job=job_id, payload=payload,
                 deadline_ms=deadline_ms, window_ms=window_ms),
            keys={"queue": queue_list}, client=client,
        )
        return [text(outcome[0]), *outcome[1:]]

    def queue_key_deadline_ms(self, expires_in: float | None) -> int:
        """How long a published job's queue key may wait for a worker (0: no limit)."""
        return 0 if expires_in is None else int(max(expires_in, 0) * 1000) + self.grace_ms

    def release_queue_key(self, queue_key: str, job_id: str = "") -> str | None:
        """Release ``queue_key`` if ``job_id`` holds it (anyone's when ``job_id`` is '')."""
        holder = self._run("release_queue_key", dict(qkey=queue_key, job=job_id))
        return text(holder) if holder else None

    # -- worker ----------------------------------------------------------------------

    def admit(self, job_id: str, **call: Any) -> AdmitOutcome:
        """Admit a delivered job (admit.lua), waiting for the reply; ``call``: the
        arguments of ``admit_args``."""
        keys, args = self.admit_args(job_id, **call)
        return self.admission(job_id, self._evalsha("admit", keys, args, self.redis))

    def admit_args(
        self,
        job_id: str,
        *,
        instance: str,
        execution_key: str,
        info: dict[str, Any],
        message: dict[str, Any],
        qk_release: bool = False,
        limit: int = 1,
        rate: tuple[str, int, int] | None = None,
        replace: bool = False,
        published_at: float = 0.0,
    ) -> tuple[list[str], list[Any]]:
        """admit.lua's KEYS and ARGV (``admit`` sends them; the worker's loop may send them
        through its ScriptPipe and read the reply with ``admission``). ``rate``: the job's
        (rate key, starts, window ms)."""
        rk, starts, window = rate or ("", 1, 1000)
        return self.call_args(
            "admit",
            dict(
                job=job_id,
                instance=instance,
                ek=execution_key,
                info=compact(info),
                message=compact(message) if execution_key or rk or replace else "",
                queue=info.get("queue") or "",
                qkey=info.get("qk") or "",
                qk_release="1" if qk_release else "0",
                limit=limit, rk=rk, rn=starts, rw=window, grace_ms=self.grace_ms,
                qd="replace" if replace else "", at=repr(published_at),
                cancel_ttl_ms=self.cancel_ttl_ms,
            ),
            keys=self.used_keys(
                parked=execution_key and self.parked_key(execution_key),
                rate=rk and self.rate_key(rk), ratewait=rk and self.ratewait_key(rk),
                rate_limits=rk and self.k_rate_limits, rate_due=rk and self.k_rate_due,
                qkwait=replace and self.qkwait_key(info.get("qk") or ""),
                cancel_reports=replace and self.k_cancel_reports),
        )

    def admission(self, job_id: str, reply: Any) -> AdmitOutcome:
        """What admit.lua's ``reply`` for ``job_id`` decided."""
        outcome = text(reply[0])
        if outcome in ("parked", "qkwait"):
            return AdmitOutcome(outcome, int(reply[1]), text(reply[2]))
        if outcome == "ratewait":
            promotion = self._promotion(reply[3:6]) if len(reply) > 3 else None
            return AdmitOutcome(outcome, int(reply[1]), opens_in=int(reply[2]) / 1000,
                                promotion=promotion)
        if outcome == "cancelled":
            return AdmitOutcome(outcome, position=int(reply[1]))
        if len(reply) > 1:
            return AdmitOutcome(outcome, crashed=self.decode(reply[1], self.k_running, job_id))
        return AdmitOutcome(outcome)

    def finish(
        self,
        job_id: str,
        *,
        execution_key: str = "",
        queue_key: str = "",
        force: bool = False,
        instance: str = "",
        outcome: str = "",
    ) -> Finish:
        """End a job's attempt: whether it was running, and the parked job promoted.

        ``instance``: the worker instance the attempt ran under; the finish does nothing if
        the job is recorded as running under another one (a stale attempt).
        ``execution_key`` may be a slot name (execution_limit): its key's slot is found.
        """
        execution_key = base_key(execution_key)
        reply = self._run(
            "finish",
            dict(
                job=job_id,
                ek=execution_key,
                qkey=queue_key,
                grace_ms=self.grace_ms,
                force="1" if force else "0",
                instance=instance,
                outcome=outcome,
            ),
            keys=self.used_keys(parked=execution_key and self.parked_key(execution_key),
                                qkwait=queue_key and self.qkwait_key(queue_key)),
        )
        ek_promotion = self._promotion(reply[1:4]) if len(reply) > 1 and reply[1] else None
        qk_promotion = self._promotion(reply[4:7]) if len(reply) > 4 else None
        return Finish(bool(int(reply[0])), ek_promotion, qk_promotion)

    def confirm_promoted(self, job_id: str) -> None:
        """The promoted job's message is in the broker: it no longer needs republishing."""
        self.redis.zrem(self.k_promoting, job_id)

    def renew(self, instance: str, *, registered: bool = True, deregister: bool = False) -> bool:
        """Renew this worker instance's lease (or end it): the lease thread's one call.
        False when the lease had already run out (``registered``: it was taken before).

        Registering (``registered=False``) first moves state kept under older key names
        (``migrate``); while workers of an older version hold live leases it raises
        ``OlderWorkersRunning``, so this worker admits nothing beside them.
        """
        if not registered and not deregister and not self.migrated:
            outcome, live = self.migrate()
            if outcome == "refused":
                raise OlderWorkersRunning(live)
        return bool(
            self._run(
                "renew",
                dict(
                    instance=instance,
                    lease_ms=self.lease_ms,
                    deregister="1" if deregister else "0",
                    registered="1" if registered else "0",
                    version=SCHEMA_VERSION,
                ),
            )
        )

    def migrate(self) -> tuple[str, list[str]]:
        """Move state kept under older key names to today's (migrate.lua): ('current', []),
        ('migrated', [keys moved, keys left]) or ('refused', [live worker instances])."""
        reply = self._run(
            "migrate",
            dict(prefix=self.prefix, version=SCHEMA_VERSION),
            keys={
                "old_held": self.prefix + "held",
                "old_paused_msg": self.prefix + "paused_msg",
                "old_paused_lists": self.prefix + "paused_lists",
            },
        )
        outcome, detail = text(reply[0]), [text(item) for item in reply[1:]]
        if outcome == "migrated" and detail[:1] != ["0"]:
            logger.warning(
                "roger: moved %s keys of an earlier celery-roger to this version's "
                "names (%s left, of an unexpected type)",
                *detail[:2],
            )
        self.migrated = outcome != "refused"
        return outcome, detail

    def lease_left_ms(self, instance: str) -> float | None:
        """How long ``instance``'s lease still lasts, by Redis's clock (None: no lease)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zscore(self.k_workers, instance)
        pipe.time()
        deadline, (seconds, micros) = pipe.execute()
        return None if deadline is None else deadline - (seconds * 1000 + micros / 1000)

    def tick(self) -> TickResult:
        """The healing work due anywhere in the partition (see tick.lua)."""
        (
            orphans,
            republish,
            freed,
            due,
            next_due,
            reports,
            paused,
            stale,
            crashed,
            quarantined,
            rate_keys,
        ) = self._run("tick", dict(grace_ms=self.grace_ms))
        promotions = []
        for i in range(0, len(republish), 2):
            job_id = text(republish[i])
            message = self.decode(republish[i + 1], self.k_msg, job_id)
            if message is not None:
                promotions.append(Promotion(job_id, message))
        return TickResult(
            orphans=objects(orphans),
            republish=promotions,
            freed_queue_keys=[text(k) for k in freed],
            due_retries=self._due(due),
            next_retry_in=None if int(next_due) < 0 else int(next_due) / 1000,
            cancel_reports=objects(reports, kombu=True),
            paused={text(q) for q in paused},
            stale_paused=[text(q) for q in stale],
            crashed=objects(crashed),
            quarantined=objects(quarantined),
            rate_keys=[text(k) for k in rate_keys],
        )

    def take_due(self, limit: int = 100) -> list[DueRetry]:
        return self._due(self._run("take_due", dict(grace_ms=self.grace_ms, limit=limit)))

    def _due(self, reply: list[Any]) -> list[DueRetry]:
        due = []
        for i in range(0, len(reply), 3):
            job_id = text(reply[i])
            entry = self.decode(reply[i + 1], self.k_retry_msg, job_id, kombu=True)
            if entry is not None:
                due.append(DueRetry(job_id, entry, text(reply[i + 2])))
        return due

    # -- orphaned queue keys (orphans.py) -----------------------------------------------

    def _orphan_keys(self) -> list[str]:
        return [
            self.k_qkeys,
            self.k_qk_pending,
            self.k_running,
            self.k_msg,
            self.k_held_msg,
            self.k_buried_msg,
            self.k_orphan_suspects,
            self.k_orphan_suspect_keys,
        ]

    def sweep_keys(
        self, *, period: float, threshold: float, count: int
    ) -> list[tuple[str, str, str]] | None:
        """One sweep step, if it is this caller's turn (else None): the (kind, job id, key)
        of suspects nowhere in roger's state for ``threshold`` seconds; kind ``"q"`` for a
        queue key, ``"e"`` for an execution key."""
        reply = self._run(
            "sweep_keys",
            dict(period_ms=int(period * 1000), threshold_ms=int(threshold * 1000), count=count),
        )
        if not reply:
            return None
        return [
            (text(reply[i]), text(reply[i + 1]), text(reply[i + 2]))
            for i in range(0, len(reply), 3)
        ]

    def orphan(self, kind: str, job_id: str, key: str, *, release: bool) -> int:
        """Act on a suspect after the broker check (see orphan.lua): 0 nothing done, 1 a
        queue key released, 2 a lost promoted job promoted again, 3 an execution key whose
        holder left nothing: the caller finishes it. ``release=False``: it is in the
        broker, its wait starts again."""
        return int(
            self._run(
                "orphan",
                dict(kind=kind, job=job_id, key=key, verdict="release" if release else "keep"),
            )
        )
