"""The worker's healing thread (``roger-heal``, main process) and its helpers: it heals
what dead workers left behind (their running jobs are finished, which frees their keys
and promotes the next parked jobs), publishes due retries and promotions, reports
cancellations and crashes. It owns the worker's ``Lease`` (renewals, on their own
thread): if renewals fail for nearly a lease, this worker's roger jobs are killed, so a
freed key never has a live holder."""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from celery import Celery
from celery.worker import state as worker_state
from redis.exceptions import RedisError

from . import orphans
from .admission import Admission
from .failure import job_from_stored, request_from_stored
from .job import Job, as_key, finite
from .lease import UNREACHABLE, Lease, Offload
from .lifecycle import (
    KEY_HANDED,
    RATE_OPENED,
    finish_quietly,
    hand_off,
     publish_due,
    report_cancelled,
    report_crash,
)
from .request import kill_job
from .store import Promotion, kombu_loads

logger = logging.getLogger("celery_roger")

TICK_SECONDS = 1.0
#: How often the worker's event loop checks the lease and healing threads.
#: A running record younger than this is never taken for ended by ``reconcile`` (its
#: admission may not have reached this worker's own books yet).
RECONCILE_MIN_AGE_SECONDS = 10.0


def _local_job_ids() -> set[str]:
    """Ids of the requests this worker holds (received and not yet done)."""
    while True:
        try:
            return {request.id for request in list(worker_state.reserved_requests)}
        except RuntimeError:  # changed size while copied from another thread
            continue


class Healer:
    """A worker's roger chores, off its event loop (main process): heals what dead workers
    left behind, publishes due retries and promotions, reports cancellations and crashes.

    It owns the worker's ``Lease`` (renewals, on their own thread) and two ``Offload``
    pools, one for broker publishes and one for callbacks, so neither a stalled broker nor
    a slow callback delays a renewal or the healing of other jobs. Every item is guarded:
    one that raises is logged and the others go on.
    """

    def __init__(self, app: Celery, admission: Admission) -> None:
        self.app = app
        self.pid = os.getpid()
        self.admission = admission
        self.store = admission.store
        self.instance = admission.instance
        self.stopping = threading.Event()
        self.wakeup = admission.wakeup  # shared: the event loop wakes this thread
        self.next_wake: float | None = None  # monotonic time a retry is due
        self.lease = Lease(self.store, self.instance, self._lose_lease, self._rename)
        self.publisher = Offload("roger-publish", 2)
        self.reporter = Offload("roger-callback", 4)
        # When to compare what Redis records as running here with what runs here: after
        # any Redis error (a finish may have failed with it) and once per lease period.
        self.reconcile_at = time.monotonic() + self.lease.lease
        self.thread = threading.Thread(target=self.run, name="roger-heal", daemon=True)
        bound = self.store.settings.orphaned_key_seconds
        # Lost messages, whose queue keys the sweep releases, happen on a Redis broker.
        self.sweep_bound = bound if bound and orphans.on_redis_broker(app) else 0.0

    def start(self) -> None:
        self.lease.start()
        self.thread.start()

    def run(self) -> None:
        while not self.stopping.is_set():
            timeout = TICK_SECONDS
            if self.next_wake is not None:
                timeout = max(0.0, min(timeout, self.next_wake - time.monotonic()))
            woken = self.wakeup.wait(timeout)
            self.wakeup.clear()
            if self.stopping.is_set():
                break
            try:
                if woken and (self.admission.cancel_reports or self.admission.revoked_ids) and (
                        self.next_wake is None or self.next_wake > time.monotonic()):
                    self._report_local()  # a cancellation to report: no need for a full tick
                else:
                    self.tick()
            except BaseException:
                logger.exception("roger: the healing thread survived an error")

    def wake_in(self, seconds: float) -> None:
        """Tick again in ``seconds`` (a retry is due then), or sooner."""
        at = time.monotonic() + seconds
        if self.next_wake is None or at < self.next_wake:
            self.next_wake = at
            self.wakeup.set()

    def watch(self) -> None:
        """Run by the worker's event loop each second: the threads roger depends on are
        alive, and the lease is not overdue (a renewal stuck in a call)."""
        if not self.lease.is_alive() and not self.stopping.is_set():
            logger.error("roger: the lease thread died; starting it again")
            self.lease = self.lease.successor()
            self.lease.start()
        if self.lease.overdue() and not self.lease.lost:
            self.lease.lose("renewals are late")
        if not self.thread.is_alive() and not self.stopping.is_set():
            logger.error("roger: the healing thread died; starting it again")
            self.thread = threading.Thread(target=self.run, name="roger-heal", daemon=True)
            self.thread.start()
        self.publisher.watch()
        self.reporter.watch()

    def tick(self) -> None:
        try:
            result = self.store.tick()
        except RedisError as exc:
            self.admission.forget_done()
            self.reconcile_at = 0.0
            if isinstance(exc, UNREACHABLE):
                logger.warning("roger: cannot heal (Redis unreachable: %s)", exc)
            else:
                logger.error("roger: the tick failed (%s); healing goes on next second", exc)
            return
        self.admission.forget_done()
        self.next_wake = (None if result.next_retry_in is None
                          else time.monotonic() + result.next_retry_in)
        for moved in result.quarantined:
            logger.error("roger: quarantined %s%s (%s): %s", moved.get("key"),
                         f"[{moved['field']}]" if "field" in moved else "",
                         moved.get("reason") or f"a {moved.get('type')}, not a "
                         f"{moved.get('expected')}", moved.get("preview"))
        for info in result.orphans:
            self._guarded("heal an orphaned job", self._orphan, info)
        crashed = [*result.crashed]
        while self.admission.crashed:
            crashed.append(self.admission.crashed.popleft())
        for info in crashed:
            logger.warning("Job %s was redelivered: its attempt on %s ended with that worker",
                           info.get("job"), info.get("worker"))
            self.reporter.submit(f"crash report of job {info.get('job')}", report_crash,
                                 self.app, info)
        if result.due_retries:
            self.publisher.submit("publish due retries", publish_due, self.app,
                                  result.due_retries)
        self._guarded("apply paused queues", self.admission.queues.converge, result.paused)
        for queue in result.stale_paused:
            self._guarded(f"release held jobs of queue {queue!r}", self._release_held, queue)
        for report in result.cancel_reports:
            self._guarded("report a cancellation", self._cancel_report, report)
        self._report_local()
        for promotion in result.republish:
            self.hand_off(promotion)
        for rate_key in result.rate_keys:
            self._guarded(f"move the line of rate key {rate_key!r}", self._rate_wake, rate_key)
        for queue_key in result.freed_queue_keys:
            logger.warning("Freed queue key %r: its publisher never confirmed the job", queue_key)
        if time.monotonic() >= self.reconcile_at:
            self._guarded("reconcile running jobs", self.reconcile)
        if self.sweep_bound:
            self._guarded("sweep queue keys", self._sweep)

    def _sweep(self) -> None:
        """A step of the orphaned-queue-key sweep (orphans.py), when it is this worker's
        turn; the broker check of old suspects runs on the publishing thread."""
        suspects = self.store.sweep_keys(period=orphans.step_seconds(self.sweep_bound),
                                         threshold=orphans.threshold_seconds(self.sweep_bound),
                                         count=orphans.STEP_KEYS)
        if suspects:
            self.publisher.submit("look for lost jobs in the broker", orphans.check_suspects,
                                  self.app, self.store, suspects, self._hand_on, key="sweep")

    def _hand_on(self, job_id: str, execution_key: str) -> None:
        finish_quietly(self.app, job_id, execution_key, "", publish=self.hand_off)

    def _guarded(self, what: str, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            logger.exception("roger: could not %s; going on with the rest", what)

    def hand_off(self, promotion: Promotion,
                 why: str = KEY_HANDED) -> None:
        """Publish a promoted job on the publishing thread."""
        self.publisher.submit(f"hand-off of job {promotion.job_id}", hand_off, self.app,
                              promotion, why, key=promotion.job_id)

    def _rate_wake(self, rate_key: str) -> None:
        """Move a rate key's line whose window may have opened (its parking worker's
        timer does this first; the tick is for lines whose worker is gone)."""
        for promotion in self.store.rate_wake(rate_key).promotions:
            self.hand_off(promotion, RATE_OPENED)

    def _release_held(self, queue: str) -> None:
        if self.store.resume(queue, release_only=True):
            self.publisher.submit("publish released jobs", publish_due, self.app,
                                  self.store.take_due())

    def _cancel_report(self, report: dict[str, Any]) -> None:
        job_id = str(report.get("job"))
        try:
            stored = kombu_loads(report["stored"])
        except Exception:  # absent (a running job) or unreadable: the job's id is enough
            stored = None
        if not isinstance(stored, dict):
            stored = {}
        job = job_from_stored(self.app, job_id, stored)
        logger.info("Cancelled job %s[%s] (it waited: %s)", job.task, job_id,
                    report.get("where"))
        self._cancelled(self.app.tasks.get(job.task), job,
                        request_from_stored(self.app, job_id, stored))

    def reconcile(self) -> None:
        """Finish attempts recorded as running here that no longer run here.

        A job's own process releases its keys when it ends; if Redis was unreachable just
        then, the record stays, and with it the job's execution key, while this worker's
        lease is alive. Such records are finished here (keys released, the next parked job
        promoted), at most one lease period after the job ended.
        """
        self.reconcile_at = time.monotonic() + self.lease.lease
        try:
            recorded = self.store.running_on(self.instance)
        except RedisError as exc:
            self.reconcile_at = 0.0
            logger.warning("roger: cannot compare running jobs with Redis: %s", exc)
            return
        if not recorded:
            return
        here = _local_job_ids()
        young = time.time() - RECONCILE_MIN_AGE_SECONDS
        for job_id, info in recorded.items():
            if job_id in here or (finite(info.get("admitted_at")) or 0.0) > young:
                continue
            ek, qk = as_key(info.get("ek")), as_key(info.get("qk"))
            if ek or qk:
                logger.warning("Job %s ended on this worker but its keys were still held "
                               "(Redis was unreachable at its end): releasing them", job_id)
            else:  # (nothing to release: a job without keys whose end was not recorded)
                logger.info("Job %s ended on this worker: forgetting it as running", job_id)
            finish_quietly(self.app, job_id, ek, qk, publish=self.hand_off,
                           instance=self.instance)

    def _report_local(self) -> None:
        """Cancellations seen by this worker's event loop: Redis work here, callbacks on
        the callback threads."""
        while self.admission.revoked_ids:
            job_id = self.admission.revoked_ids.popleft()
            try:
                self.store.cancel(job_id)
            except RedisError as exc:
                logger.warning("could not record Celery's revoke of %s: %s", job_id, exc)
        while self.admission.cancel_reports:
            self._cancelled(*self.admission.cancel_reports.popleft())

    def _cancelled(self, task: Any, job: Job, request: Any = None) -> None:
        """Store REVOKED and run on_cancel (callback threads). ``request``: the job's
        request, to count it in its chord; None where Celery has already done that."""
        self.reporter.submit(f"cancel report of job {job.id}", report_cancelled, self.app,
                             task, job, request)

    def _orphan(self, info: dict[str, Any]) -> None:
        """A job whose worker died: its keys are freed; its message is redelivered."""
        job_id = str(info.get("job"))
        logger.warning("Job %s was running on %s, whose lease expired: releasing its keys",
                       job_id, info.get("worker"))
        if finish_quietly(self.app, job_id, as_key(info.get("ek")), as_key(info.get("qk")),
                          publish=self.hand_off, instance=info.get("instance")):
            # else another worker's tick reported it
            self.reporter.submit(f"crash report of job {job_id}", report_crash, self.app, info)

    def _rename(self) -> str:
        """A new instance name for this worker (its lease ran out): new admissions and
        the healer use it; the old name's records are healed as a dead worker's."""
        instance = new_instance(self.admission.hostname)
        self.instance = self.admission.instance = instance
        return instance

    def _lose_lease(self, why: str) -> None:
        """Stop this worker's roger jobs: another worker may take their keys over."""
        for request in list(self.admission.admitted.values()):
            request.roger_watch.lease_lost = True
            if request.roger_watch.started:
                kill_job(request)

    def stop(self) -> None:
        self.stopping.set()
        self.wakeup.set()
        self.lease.stop()


def new_instance(hostname: str) -> str:
    """A name for one life of this worker's lease: ``hostname/pid/random``."""
    return f"{hostname}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
