"""Roger's Redis layer: cancellation, pause and resume, and the operator's actions on
keys and parked jobs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .keys import rate_text
from .records import Promotion, RateWake, StoredJob, compact, dumps, text
from .store_base import StoreBase

#: start.lua's arguments when no ended job rides on the call.
_NOT_DONE = {"done": "", "done_record": "", "done_outcome": ""}


class ControlStore(StoreBase):
    """Cancel, pause, hold, resume; keys and parked jobs as an operator sees them."""

    def start(
        self,
        job_id: str,
        queue: str,
        info: dict[str, Any] | str | None = None,
        instance: str = "",
        queue_key: str = "",
        qk_release: bool = False,
        done: dict[str, str] | None = None,
    ) -> tuple[str, bool, dict[str, Any] | None]:
        """The check right before a job's body runs, and the admission of a job without
        an execution key (``info``, or its JSON as ``compact`` writes it): (outcome, report
        its cancel, crashed earlier attempt). ``done``: the end of this process's previous
        job without keys, carried out first (``deferred.Ended.args``).
        """
        reply = self._run(
            "start",
            dict(
                job=job_id,
                queue=queue,
                info=(info if isinstance(info, str) else compact(info)) if info else "",
                instance=instance,
                qkey=queue_key,
                qk_release="1" if qk_release else "0",
                **{**_NOT_DONE, **(done or {})},
            ),
            # (a job without a queue key: its three keys are not touched, nor type-checked)
            keys=self.used_keys(qkeys=queue_key and self.k_qkeys,
                                qk_pending=queue_key and self.k_qk_pending,
                                qk_until=queue_key and self.k_qk_until),
        )
        outcome = text(reply[0])
        if outcome == "cancelled":
            return outcome, bool(int(reply[1])), None
        crashed = self.decode(reply[1], self.k_running, job_id) if len(reply) > 1 else None
        return outcome, False, crashed

    def forget_ended(self, job_id: str, record: str, outcome: str = "") -> None:
        """The deferred end of a job without keys (deferred.py): forget it as running if
        its running record is still ``record``, the one its start wrote."""
        self._run("forget_ended", dict(job=job_id, record=record,
                                       outcome=outcome or "ended", instance=""))

    def claim_cancel(self, job_id: str) -> bool:
        """Remember ``job_id`` as cancelled; true for the one caller that reports it."""
        return bool(self._run("claim_cancel", dict(job=job_id, ttl_ms=self.cancel_ttl_ms)))

    def cancel(self, job_id: str, by: str = "") -> tuple[dict[str, Any] | None, str]:
        """Cancel: (its running record or None, where it waited in Redis or ''); ``by``:
        who cancels it (its history)."""
        running, where = self._run(
            "cancel", dict(job=job_id, ttl_ms=self.cancel_ttl_ms, prefix=self.prefix, by=by)
        )
        return (self.decode(running, self.k_running, job_id) if running else None), text(where)

    def running_on(self, instance: str) -> dict[str, dict[str, Any]]:
        """The attempts recorded as running under one worker instance."""
        found = {}
        for job_id, raw in self.redis.hgetall(self.k_running).items():
            info = self.decode(raw, self.k_running, text(job_id))
            if info is not None and info.get("instance") == instance:
                found[text(job_id)] = info
        return found

    def is_cancelled(self, job_id: str) -> bool:
        expiry = self.redis.zscore(self.k_cancelled, job_id)
        return expiry is not None and expiry > self.redis_time_ms()

    def pause(self, queue: str, reason: str | None) -> None:
        self._run("pause", dict(queue=queue, reason=compact(reason)))

    def paused(self) -> dict[str, dict[str, Any]]:
        """Paused queues and their pause records. An unreadable record is quarantined and
        replaced by one without a reason: the queue stays paused."""
        found = {}
        for raw_queue, raw in self.redis.hgetall(self.k_paused).items():
            queue = text(raw_queue)
            record = self.decode(raw, self.k_paused, queue)
            if record is None:
                record = {"at": None, "reason": None}
                self.redis.hsetnx(self.k_paused, queue, compact(record))
            found[queue] = record
        return found

    def hold(self, job_id: str, queue: str, stored: dict[str, Any]) -> None:
        self._run(
            "hold",
            dict(job=job_id, stored=dumps({**stored, "queue": queue}), queue=queue),
            keys={"held_queue": self.held_key(queue)},
        )

    def resume(self, queue: str, *, release_only: bool = False) -> int:
        """Forget the pause of ``queue`` and make its held jobs due now; returns how many."""
        return int(
            self._run(
                "resume",
                dict(queue=queue, resume="0" if release_only else "1"),
                keys={"held_queue": self.held_key(queue)},
            )
        )

    def held_count(self, queue: str) -> int:
        return int(self.redis.llen(self.held_key(queue)))

    def drop_parked(
        self, job_id: str, *, execution_key: str, queue_key: str = "", queue: str = ""
    ) -> bool:
        return bool(
            self._run(
                "drop_parked",
                dict(job=job_id, qkey=queue_key, queue=queue),
                keys={"parked": self.parked_key(execution_key)},
            )
        )

    def purge_queue(self, queue: str, batch: int = 500) -> dict[str, int]:
        """Remove the jobs roger keeps for ``queue`` (parked, held for a pause, waiting
        retries), releasing their queue keys: {"parked", "held", "retrying"} removed. The
        broker's copy of the queue is the caller's (HSCAN: operator use only)."""
        found: dict[str, list[str]] = {"parked": [], "retrying": []}
        for place, key in (("parked", self.k_msg), ("retrying", self.k_retry_msg)):
            for job_id, raw in self.redis.hscan_iter(key, count=500):
                value = self.decode(raw, key, text(job_id), kombu=True)
                roger = StoredJob.of(value).headers.get("roger") if value else None
                if isinstance(roger, dict) and roger.get("q") == queue:
                    found[place].append(text(job_id))
        counts = dict.fromkeys(("parked", "held", "retrying"), 0)
        for i in range(0, max(len(found["parked"]), len(found["retrying"]), 1), batch):
            reply = self._run(
                "purge_queue",
                dict(queue=queue, prefix=self.prefix,
                     parked=compact(found["parked"][i:i + batch]),
                     retrying=compact(found["retrying"][i:i + batch])),
                keys={"held_queue": self.held_key(queue)},
            )
            for name, n in zip(("parked", "held", "retrying"), reply, strict=True):
                counts[name] += int(n)
        return counts

    def parked_messages(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every stored message of a parked or promoted job (HSCAN: operator use only)."""
        for job_id, raw in self.redis.hscan_iter(self.k_msg, count=500):
            message = self.decode(raw, self.k_msg, text(job_id))
            if message is not None:
                yield text(job_id), message

    def set_limit(self, execution_key: str, limit: int | None) -> list[Promotion]:
        """Set (None: clear) the live limit of ``execution_key``; returns the parked jobs
        promoted into the slots a raised limit opened (set_limit.lua)."""
        reply = self._run(
            "set_limit",
            dict(ekey=execution_key, limit="" if limit is None else int(limit),
                 grace_ms=self.grace_ms),
            keys={"parked": self.parked_key(execution_key)},
        )
        promotions = []
        for i in range(0, len(reply), 3):
            job_id = text(reply[i])
            message = self.decode(reply[i + 1], self.k_msg, job_id)
            if message is not None:
                promotions.append(Promotion(job_id, message, pushed=text(reply[i + 2]) ==
                                            "pushed"))
        return promotions

    def _promotion(self, reply: list[Any]) -> Promotion | None:
        """A promoted job from a script's (job, message, how) triple (None: unreadable)."""
        job_id = text(reply[0])
        message = self.decode(reply[1], self.k_msg, job_id)
        if message is None:
            return None
        return Promotion(job_id, message, pushed=len(reply) > 2 and text(reply[2]) == "pushed")

    def rate_wake(self, rate_key: str) -> RateWake:
        """Move rate key ``rate_key``'s line as far as its window allows (rate_wake.lua)."""
        promoted, next_ms = self._run(
            "rate_wake", dict(rk=rate_key, grace_ms=self.grace_ms, reserve_ms=self.grace_ms),
            keys={"rate": self.rate_key(rate_key), "ratewait": self.ratewait_key(rate_key)},
        )
        promotions = [self._promotion(promoted[i:i + 3]) for i in range(0, len(promoted), 3)]
        return RateWake([p for p in promotions if p is not None],
                        None if int(next_ms) < 0 else int(next_ms) / 1000)

    def set_rate(self, rate_key: str, rate: tuple[int, int] | None) -> list[Promotion]:
        """Set (None: clear) the live rate of ``rate_key`` as (starts, window ms); returns
        the waiting jobs a raised rate let start at once."""
        if rate is None:
            self.redis.hdel(self.k_rate_limits, rate_key)
        else:
            self.redis.hset(self.k_rate_limits, rate_key, f"{rate[0]}/{rate[1]}")
        return self.rate_wake(rate_key).promotions

    def rates(self) -> dict[str, str]:
        """The live rates, by key, as users write them ("100/m")."""
        found = {}
        for key, raw in self.redis.hgetall(self.k_rate_limits).items():
            starts, _, window = text(raw).partition("/")
            if starts.isdigit() and window.isdigit():
                found[text(key)] = rate_text(int(starts), int(window))
        return found

    def limits(self) -> dict[str, int]:
        """The live execution limits, by key."""
        return {text(k): int(v) for k, v in self.redis.hgetall(self.k_limits).items()
                if text(v).isdigit()}

    def queue_key_holder(self, queue_key: str) -> str | None:
        holder = self.redis.hget(self.k_qkeys, queue_key)
        return text(holder) if holder else None

    def execution_key_holder(self, execution_key: str) -> str | None:
        holder = self.redis.hget(self.k_holders, execution_key)
        return text(holder) if holder else None

    def parked_ids(self, execution_key: str) -> list[str]:
        return [text(j) for j in self.redis.lrange(self.parked_key(execution_key), 0, -1)]
