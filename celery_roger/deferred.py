"""The end of a job without keys, folded into the next start of its pool process.

A job with neither an execution key nor a queue key releases nothing when it ends: its
finish only forgets its running record. Sending that alone costs the pool process a
Redis round trip per job (a tenth of a worker's throughput on a small machine), so the
pool process keeps it here and ``start.lua`` carries it out at the beginning of the
process's next start check: one round trip per job instead of two.

When no job follows, a flusher thread sends it on its own after ``FLUSH_AFTER_SECONDS``;
the process's exit (``worker_process_shutdown``: ``max_tasks_per_child``, a warm
shutdown) sends it at once. It carries the running record that the job's start wrote,
and the script removes the record only if it is still that one, so a deferred end never
removes the record of a later attempt of the same job.

What it costs: for up to ``FLUSH_AFTER_SECONDS`` after a job without keys ended, roger
still counts it as running (``info()``, ``job()``); if the whole worker is killed in that
moment, the job is reported as crashed with its worker (``on_error`` with
``WorkerCrashed``) although it ended; if Redis cannot be reached, the worker's
reconcile forgets the record later (``Healer.reconcile``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

logger = logging.getLogger("celery_roger")

#: How long an ended job without keys waits for the next start of its process.
FLUSH_AFTER_SECONDS = 0.02


@dataclass(frozen=True)
class Ended:
    """A job without keys that ended in this process, not yet forgotten as running."""

    store: Any
    job_id: str
    record: str  # the running record its start wrote
    at: float
    outcome: str = ""  # how it ended, for its history ("succeeded", "failed" ...)

    def args(self) -> dict[str, str]:
        """``start.lua``'s arguments that name it (``done``, ``done_record``,
        ``done_outcome``)."""
        return {"done": self.job_id, "done_record": self.record, "done_outcome": self.outcome}

    def flush(self) -> None:
        self.store.forget_ended(self.job_id, self.record, self.outcome)


class Deferred:
    """This process's ended job, if any (one at a time: a pool process runs one job)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._ended: Ended | None = None
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._idle = False  # the flusher waits for a put (else: for a deadline)
        self._sending = False  # the flusher is sending one (flush waits for it)

    def put(self, store: Any, job_id: str, record: str, outcome: str = "") -> None:
        """Keep the end of ``job_id``, whose start wrote running record ``record``, for
        the next start (or the flusher); ``outcome``: how it ended (its history)."""
        ended = Ended(store, job_id, record, time.monotonic(), outcome)
        with self._cond:
            earlier, self._ended = self._ended, ended
            self._wake()
        if earlier is not None:  # a start that did not take it (a fresh admission)
            self._flush(earlier)

    def take(self, store: Any) -> Ended | None:
        """The ended job for a start on ``store`` to carry out (None: there is none); one
        kept for another store is sent now."""
        with self._cond:
            ended, self._ended = self._ended, None
        if ended is not None and ended.store is not store:
            self._flush(ended)
            return None
        return ended

    def give_back(self, ended: Ended | None) -> None:
        """A start that carried ``ended`` failed: keep it for the flusher (a repeat is
        harmless: the script removes only the record of that attempt)."""
        if ended is None:
            return
        with self._cond:
            if self._ended is None:
                self._ended = ended
                self._wake()
                return
        self._flush(ended)

    def flush(self, timeout: float = 2.0) -> None:
        """Send the ended job now, and let a send under way finish (the process exits)."""
        with self._cond:
            ended, self._ended = self._ended, None
            self._cond.wait_for(lambda: not self._sending, timeout)
        if ended is not None:
            self._flush(ended)

    def _flush(self, ended: Ended) -> None:
        try:
            ended.flush()
        except RedisError as exc:  # the worker's reconcile forgets it (Healer.reconcile)
            logger.warning("roger: cannot forget ended job %s as running (Redis: %s); "
                           "its worker forgets it later", ended.job_id, exc)

    def _wake(self) -> None:
        # (under self._cond) only a flusher with no deadline needs waking: under load
        # (a job ends, the next start takes it) it wakes once per FLUSH_AFTER_SECONDS,
        # not once per job (each wake costs the job's thread the GIL for a moment)
        if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
            self._pid = os.getpid()  # one flusher per process, started after the fork
            self._thread = threading.Thread(target=self._run, name="roger-deferred-finish",
                                            daemon=True)
            self._thread.start()
        elif self._idle:
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._ended is None:
                        self._idle = True
                        self._cond.wait()
                        self._idle = False
                        continue
                    wait = self._ended.at + FLUSH_AFTER_SECONDS - time.monotonic()
                    if wait <= 0:
                        break
                    self._cond.wait(wait)  # taken or replaced meanwhile: look again
                ended, self._ended = self._ended, None
                self._sending = True
            try:
                self._flush(ended)
            finally:
                with self._cond:
                    self._sending = False
                    self._cond.notify_all()


#: The one per process (a pool process runs one job at a time).
DEFERRED = Deferred()
