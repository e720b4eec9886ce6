"""Roger's Redis layer: retries and the buried queue."""

from __future__ import annotations

from typing import Any

from .records import DueRetry, dumps, text
from .store_base import StoreBase


class FailureStore(StoreBase):
    """Retries waiting for their time, and the buried queue."""

    def schedule_retry(self, job_id: str, delay: float, entry: dict[str, Any]) -> bool:
        """Keep a retry until it is due; false (nothing kept) if the job is cancelled."""
        return bool(
            self._run(
                "schedule_retry", dict(job=job_id, delay_ms=int(delay * 1000), entry=dumps(entry))
            )
        )

    def confirm_retries(self, published: list[DueRetry]) -> None:
        if published:
            self._run(
                "confirm_retries", rest=[x for due in published for x in (due.job_id, due.score)]
            )

    def retry_due_at(self, job_id: str) -> float | None:
        """When a waiting retry of ``job_id`` is due (Unix seconds), or None."""
        score = self.redis.zscore(self.k_retry, job_id)
        return None if score is None else score / 1000

    def bury(self, job_id: str, queue: str, entry: dict[str, Any]) -> list[str]:
        """Keep a buried job's entry (indexed by its ``task`` and ``error_type``); returns
        the ids dropped to respect the cap."""
        task, error_type = entry.get("task"), entry.get("error_type")
        dropped = self._run(
            "bury",
            dict(job=job_id, entry=dumps(entry), cap=self.settings.buried_max, queue=queue,
                 task=task if isinstance(task, str) else "",
                 error_type=error_type if isinstance(error_type, str) else "",
                 prefix=self.prefix),
            keys={"buried_queue": self.buried_key(queue)},
        )
        return [text(d) for d in dropped]

    def buried_ids(self, queue: str) -> list[str]:
        return [text(j) for j in self.redis.zrevrange(self.buried_key(queue), 0, -1)]

    def buried_queues(self) -> list[str]:
        return sorted(text(q) for q in self.redis.smembers(self.k_buried_queues))

    def requeue_take(self, job_id: str) -> tuple[str, Any]:
        """('missing', None), ('taken', holder id: another job has its queue key) or
        ('ok', entry)."""
        reply = self._run("requeue_take", dict(job=job_id, grace_ms=self.grace_ms))
        outcome = text(reply[0])
        if outcome == "ok":
            entry = self.decode(reply[1], self.k_buried_msg, job_id, kombu=True)
            return ("ok", entry) if entry is not None else ("missing", None)
        return outcome, text(reply[1]) if len(reply) > 1 else None

    def unbury(self, job_id: str, queue: str, queue_key: str = "") -> bool:
        return bool(
            self._run(
                "unbury",
                dict(job=job_id, qkey=queue_key, prefix=self.prefix),
                keys={"buried_queue": self.buried_key(queue)},
            )
        )

    def purge_buried(self, queue: str) -> int:
        return int(
            self._run(
                "purge_buried", dict(queue=queue, prefix=self.prefix),
                keys={"buried_queue": self.buried_key(queue)},
            )
        )

    def drop_buried(self, job_ids: list[str]) -> int:
        """Delete these buried jobs (any queue); returns how many were buried."""
        return int(self._run("drop_buried", rest=[self.prefix, *job_ids])) if job_ids else 0

    def is_buried(self, job_id: str) -> bool:
        """Whether ``job_id`` is in the buried queue."""
        return bool(self.redis.hexists(self.k_buried_msg, job_id))
