"""``Roger(app)``: the user's handle on roger state."""

from __future__ import annotations

from celery import Celery

from .runtime import install, runtime
from .worker import finish_job, hand_off, job_header, job_keys

KEY_KINDS = ("queue", "execution")


class Roger:
    """Inspect and steer the roger state of a Celery app's partition."""

    def __init__(self, app: Celery) -> None:
        self.app = install(app)
        self.store = runtime(app).store

    @property
    def partition(self) -> str:
        return self.store.partition

    def release_key(self, kind: str, key: str) -> str | None:
        """Force-release a queue key or execution key; returns the job that held it.

        Releasing an execution key hands it to the next parked job. The job that held
        it is not stopped.
        """
        if kind not in KEY_KINDS:
            raise ValueError(f"kind must be one of {KEY_KINDS}, got {kind!r}")
        if not isinstance(key, str) or not key:
            raise ValueError(f"key must be a non-empty str, got {key!r}")
        if kind == "queue":
            return self.store.release_queue_key(key)
        holder = self.store.execution_key_holder(key)
        promotion = self.store.finish(holder or "", execution_key=key, force=True)
        if promotion is not None:
            hand_off(self.app, promotion)
        return holder

    def purge_queue(self, queue: str) -> int:
        """Remove every waiting job of ``queue``, in the broker and parked; returns how many.

        The queue keys (and handed-over execution keys) of the removed jobs are released.
        Running jobs are not touched.
        """
        if not isinstance(queue, str) or not queue:
            raise ValueError(f"queue must be a non-empty str, got {queue!r}")
        removed = 0
        for job_id, message in list(self.store.parked_messages()):
            headers = message.get("headers") or {}
            if job_header(headers).get("q") != queue:
                continue
            ek, qk = job_keys(headers)
            if self.store.drop_parked(job_id, execution_key=ek, queue_key=qk):
                removed += 1
        with self.app.connection_for_write() as conn:
            channel = conn.default_channel
            while True:
                message = channel.basic_get(queue, no_ack=True)
                if message is None:
                    break
                removed += 1
                headers = message.headers or {}
                ek, qk = job_keys(headers)
                if headers.get("id") and (ek or qk):
                    finish_job(self.app, str(headers["id"]), execution_key=ek, queue_key=qk)
        return removed

    def __repr__(self) -> str:
        return f"<Roger partition={self.partition!r}>"


