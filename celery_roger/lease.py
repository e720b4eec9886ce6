"""A worker's lease, and the threads that must never be held up by anything else.

* ``Lease`` renews this worker's lease each second (more often for a lease under 8 s):
  one Redis call, nothing else.
  It never runs user code and never waits on the broker, so a slow callback or a stalled
  broker cannot let the lease lapse while the worker's jobs run. When renewals fail for
  nearly a lease (or the lease turns out to have run out, e.g. after SIGSTOP), it calls
  ``on_lost`` once: the worker stops its roger jobs, so a key another worker takes over
  never has a live holder.
* ``Offload`` runs callbacks and broker publishes on threads of their own, each item
  guarded (``BaseException`` included), so one slow or raising item delays only itself.
* Every loop here survives any exception, logging it; ``watch`` (run by the worker's
  event loop each second) restarts a thread that died anyway and stops the roger jobs if
  the lease may have lapsed meanwhile.
"""

from __future__ import annotations

import functools
import logging
import mmap
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from billiard.process import current_process
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

logger = logging.getLogger("celery_roger")


#: Redis errors that mean "Redis unreachable"; any other error (a script error, a
#: refused command) is a fault to log, not an outage.
UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)


class PoolSlots:
    """Which job each prefork pool process runs now, in memory the worker's main process
    shares with its pool (an anonymous shared mapping made at import, before the pool
    forks; each process writes only its own slot, at ``billiard``'s process index).

    The main process's own view can be stale: a worker stopped by SIGSTOP with its pool
    (``kill -STOP`` of its process group) resumes with the pool's results still unread, so
    a job it believes running may have ended, and its process taken up another job. A kill
    meant for the first job must not hit the second: ``runs_other`` tells. A pool of more
    than ``COUNT`` processes leaves the extra ones without a slot: they are killed as
    before, on the main process's view alone.
    """

    SLOT = 128  # bytes: pid (8), length (2), job id (at most 118 bytes)
    COUNT = 512

    def __init__(self) -> None:
        self._map = mmap.mmap(-1, self.SLOT * self.COUNT)

    def _offset(self, index: Any) -> int | None:
        if not isinstance(index, int) or not 0 <= index < self.COUNT:
            return None
        return index * self.SLOT

    def running(self, index: Any, job_id: str) -> None:
        """In a pool process: it runs ``job_id`` now (task_prerun)."""
        offset = self._offset(index)
        if offset is None:
            return
        raw = job_id.encode(errors="replace")[:self.SLOT - 10]
        view = self._map
        view[offset:offset + 8] = bytes(8)  # readers skip the slot while it changes
        view[offset + 8:offset + 10] = len(raw).to_bytes(2, "little")
        view[offset + 10:offset + 10 + len(raw)] = raw
        view[offset:offset + 8] = os.getpid().to_bytes(8, "little")

    def idle(self, index: Any) -> None:
        """In a pool process: its job ended (task_postrun)."""
        offset = self._offset(index)
        if offset is not None:
            self._map[offset + 8:offset + 10] = bytes(2)

    def runs_other(self, pid: int, job_id: str) -> bool:
        """In the main process: whether process ``pid`` is known to run another job than
        ``job_id`` now (False when it runs that job, is idle, or is not known)."""
        raw = job_id.encode(errors="replace")[:self.SLOT - 10]
        wanted = pid.to_bytes(8, "little")
        view = self._map
        for offset in range(0, self.SLOT * self.COUNT, self.SLOT):
            if view[offset:offset + 8] != wanted:
                continue
            length = int.from_bytes(view[offset + 8:offset + 10], "little")
            current = bytes(view[offset + 10:offset + 10 + length])
            if view[offset:offset + 8] != wanted:  # rewritten meanwhile: a new job
                return True
            return length > 0 and current != raw
        return False


#: This worker's pool slots (shared with the pool processes forked after this import).
POOL_SLOTS = PoolSlots()


def in_pool_process() -> bool:
    """True in a prefork pool process (where a job's worker can kill it)."""
    return current_process().name.startswith("ForkPoolWorker")


def pool_index() -> int | None:
    """This pool process's index in its pool (None outside a prefork pool process)."""
    index = getattr(current_process(), "index", None) if in_pool_process() else None
    return index if isinstance(index, int) else None


def renew_seconds(lease: float) -> float:
    """How often a lease is renewed: each second, more often for a short lease."""
    return min(1.0, lease / 8)


def safety_seconds(lease: float) -> float:
    """How long before its lease could run out a worker stops its roger jobs (at least two
    renewals' worth, so that one slow renewal is not taken for a lost lease)."""
    return max(renew_seconds(lease) * 2, min(5.0, lease / 3))


class Lease(threading.Thread):
    """Renews ``instance``'s lease in ``store``; calls ``on_lost`` when it lapses."""

    def __init__(self, store: Any, instance: str, on_lost: Callable[[str], None],
                 rename: Callable[[], str] | None = None) -> None:
        super().__init__(name="roger-lease", daemon=True)
        self.store = store
        self.instance = instance
        self.on_lost = on_lost
        #: gives the worker a new instance name (after its lease ran out), and returns it
        self.rename = rename
        self.lease = store.settings.lease_seconds
        self.safety = safety_seconds(self.lease)
        self.every = renew_seconds(self.lease)
        self.stopping = threading.Event()
        #: monotonic time the last successful renewal was sent
        self.last_renewed = time.monotonic()
        self.registered = False
        self.lost = False
        self._lock = threading.Lock()
        self._last_error = ""

    def renew(self) -> None:
        """One renewal; a failure that leaves too little of the lease loses it."""
        sent = time.monotonic()
        try:
            kept = self.store.renew(self.instance, registered=self.registered)
        except Exception as exc:  # told apart below
            kind = "unreachable" if isinstance(exc, UNREACHABLE) else "error"
            message = f"Redis {kind}: {exc}"
            if message != self._last_error:
                log = logger.warning if kind == "unreachable" else logger.error
                log("roger: cannot renew this worker's lease (%s)", message)
                self._last_error = message
            if time.monotonic() - self.last_renewed > self.lease - self.safety:
                self.lose(message)
            return
        self._last_error = ""
        if not kept:
            self.lose("its lease had run out (the worker was stopped or stalled longer "
                      "than roger_lease_seconds)")
            # Other workers may have taken this instance's jobs for dead, and a copy of one
            # may run again under a new admission: the worker registers again under a new
            # name, so whatever its stale attempts finish can never be the live copies'.
            if self.rename is not None:
                self.instance = self.rename()
                logger.warning("roger: this worker registers again as %s", self.instance)
            self.registered = False
            return
        self.registered = True
        self.last_renewed = sent
        if self.lost:
            logger.warning("roger: this worker's lease is renewed again")
            self.lost = False

    def lose(self, why: str) -> None:
        with self._lock:
            if self.lost:
                return
            self.lost = True
        logger.error("roger: lease not renewed for %.1fs (%s); stopping this worker's roger "
                     "jobs", time.monotonic() - self.last_renewed, why)
        try:
            self.on_lost(why)
        except BaseException:  # the lease thread must survive anything
            logger.exception("roger: stopping this worker's roger jobs failed")

    def overdue(self) -> bool:
        """Whether the lease may lapse before it is renewed again (checked by ``watch``)."""
        return time.monotonic() - self.last_renewed > self.lease - self.safety

    def run(self) -> None:
        while not self.stopping.wait(self.every):
            try:
                self.renew()
            except BaseException:
                logger.exception("roger: the lease thread survived an error")

    def stop(self) -> None:
        self.stopping.set()

    def successor(self) -> Lease:
        """A new thread for this lease (this one died), where this one left off."""
        lease = Lease(self.store, self.instance, self.on_lost, self.rename)
        lease.last_renewed, lease.registered, lease.lost = (
            self.last_renewed, self.registered, self.lost)
        return lease


class Offload:
    """Runs items (callbacks, broker publishes) off the lease and healing threads.

    Each item is guarded; an item with a ``key`` already pending is not queued twice (a
    promotion the healer finds again while its publish is stalled). The threads are
    daemons: a callback that never returns does not hold up the worker's exit.
    """

    def __init__(self, name: str, threads: int) -> None:
        self.name = name
        self._queue: queue.SimpleQueue[tuple[str, Callable[[], Any], str | None]] = \
            queue.SimpleQueue()
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._threads = [self._start(i) for i in range(threads)]

    def _start(self, i: int) -> threading.Thread:
        thread = threading.Thread(target=self._work, name=f"{self.name}-{i}", daemon=True)
        thread.start()
        return thread

    def submit(self, what: str, fn: Callable[..., Any], *args: Any, key: str | None = None,
               **kwargs: Any) -> bool:
        """Queue ``fn(*args, **kwargs)``; false if an item with ``key`` is pending."""
        with self._lock:
            if key is not None:
                if key in self._pending:
                    return False
                self._pending.add(key)
        self._queue.put((what, functools.partial(fn, *args, **kwargs), key))
        return True

    def _work(self) -> None:
        while True:
            what, fn, key = self._queue.get()
            try:
                fn()
            except BaseException:  # one item must not stop the others
                logger.exception("roger: %s failed", what)
            finally:
                if key is not None:
                    with self._lock:
                        self._pending.discard(key)

    def watch(self) -> None:
        """Replace a thread that died (nothing here should let one die)."""
        for i, thread in enumerate(self._threads):
            if not thread.is_alive():
                logger.error("roger: thread %s died; starting it again", thread.name)
                self._threads[i] = self._start(i)


def start_again(thread: threading.Thread, make: Callable[[], threading.Thread]
                ) -> threading.Thread:
    """A thread that died is logged and replaced by a new one (returned)."""
    if thread.is_alive():
        return thread
    logger.error("roger: thread %s died; starting it again", thread.name)
    replacement = make()
    replacement.start()
    return replacement


class JobGuard:
    """In a prefork pool process: a keyed job must not outlive its worker's lease.

    The worker stops its roger jobs when its lease lapses, but a worker's main process
    stopped by SIGSTOP (its pool processes running on) cannot: another worker takes its
    jobs for dead and hands their execution keys on. So while a job with an execution key
    runs, a thread of its own process reads the lease each renewal period, and kills the
    process (a crash of that attempt, which the worker reports when it continues) when
    what is left of the lease drops under half the safety margin, or the lease is gone.
    An unreachable Redis is left to the worker's own lease thread.
    """

    def __init__(self, store: Any) -> None:
        self.store = store
        self.lease = store.settings.lease_seconds
        self.every = renew_seconds(self.lease)
        self.margin_ms = safety_seconds(self.lease) * 500
        self.current: tuple[str, str] | None = None  # (job id, worker instance)
        self._thread: threading.Thread | None = None

    def watch(self, job_id: str, instance: str) -> None:
        self.current = (job_id, instance)
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="roger-job-guard",
                                            daemon=True)
            self._thread.start()

    def done(self) -> None:
        self.current = None

    def _run(self) -> None:
        while True:
            time.sleep(self.every)
            current = self.current
            if current is None:
                continue
            try:
                left = self.store.lease_left_ms(current[1])
            except Exception:  # Redis unreachable: the worker's lease thread handles it
                continue
            if self.current == current and (left is None or left < self.margin_ms):
                logger.error("roger: job %s stops: its worker's lease %s (the worker is "
                             "stopped or stalled; another worker may take its key over)",
                             current[0], "is gone" if left is None
                             else f"ends in {max(left, 0):.0f} ms")
                os.kill(os.getpid(), signal.SIGKILL)
