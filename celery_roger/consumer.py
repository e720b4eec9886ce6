"""The consumer bootstep that makes a worker roger's (attached the way Celery's own
``gossip`` and ``heart`` steps are): admission in front of the pool, the lease and
healing threads started before the worker consumes, watched by the event loop each
second, and this worker's lease given back at shutdown."""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Celery, bootsteps, signals
from redis.exceptions import AuthenticationError, RedisError

from .admission import Admission
from .config import redact_url, setting_name
from .errors import ConfigurationError, OlderWorkersRunning
from .healer import Healer, new_instance
from .job import job_keys
from .kombu_guard import guard_redis_transport
from .lifecycle import finish_quietly
from .pipe import ScriptPipe, can_pipe
from .redis_guard import guard_fork
from .runtime import healers, pop_healer, register_healer, runtime
from .store_base import SCRIPTS

logger = logging.getLogger("celery_roger")

#: How often the worker's event loop checks the lease and healing threads.
WATCH_SECONDS = 1.0


def _check_credentials(app: Celery) -> None:
    """Stop the worker at start if roger's Redis refuses its credentials: a setting to
    fix, not an outage to wait out (the lease thread waits out an unreachable Redis)."""
    store = runtime(app).store
    try:
        store.redis.ping()
    except AuthenticationError as exc:
        raise ConfigurationError(
            f"setting {setting_name(app, 'roger_redis_url')}: Redis at "
            f"{redact_url(store.settings.redis_url)} refused the credentials: {exc}"
        ) from exc
    except RedisError:
        pass


def _refuse_beside_older_workers(app: Celery) -> None:
    """Stop the worker at start while workers of an earlier celery-roger run (they keep
    state under older key names); otherwise move their state to this version's names. A
    lease of theirs is waited out once (a worker stopped a moment ago). With Redis
    unreachable, the lease thread does this when it first registers."""
    store = runtime(app).store
    deadline = time.monotonic() + store.settings.lease_seconds + 2
    while True:
        try:
            outcome, live = store.migrate()
        except RedisError:
            return
        if outcome != "refused":
            return
        if time.monotonic() >= deadline:
            raise ConfigurationError(str(OlderWorkersRunning(live)))
        logger.warning("roger: waiting for the leases of workers of an earlier celery-roger "
                       "to end: %s", ", ".join(live))
        time.sleep(1.0)


class RogerConsumerStep(bootsteps.StartStopStep):
    """Installs admission and starts the lease and healing threads before the worker
    consumes; the event loop watches them each second."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.healer: Healer | None = None
        self.admission: Admission | None = None
        self._watch: Any = None

    def start(self, c: Any) -> None:
        runtime(c.app).callbacks  # noqa: B018 (a bad roger_callbacks stops the worker here)
        _check_credentials(c.app)
        _refuse_beside_older_workers(c.app)
        if not isinstance(c.on_task_request, Admission):
            c.on_task_request = Admission(c, c.app, new_instance(c.hostname))
            c.update_strategies()
        admission = self.admission = c.on_task_request
        admission.detached = False  # (set while the loop closed: a broker reconnect)
        store = admission.store
        if admission.pipe is not None and admission.pipe.hub is not c.hub:
            admission.pipe.close()  # (a loop of its own for this consumer)
            admission.pipe = None
        if admission.pipe is None and c.hub is not None and store.settings.pipelined_admission \
                and can_pipe(store.redis):
            admission.pipe = ScriptPipe(store.redis, c.hub, scripts=(SCRIPTS["admit"].source,),
                                        before_close=admission.detach)
        c.on_task_request.queues.start()
        if self.healer is None:
            healer = self.healer = Healer(c.app, c.on_task_request)
            healer.lease.renew()
            healer.tick()
            healer.start()
            register_healer(healer)
        # Registered again at each start: Celery cancels the timer entries made while
        # its loop started when that loop fails (a lost broker connection).
        if self._watch is not None:
            self._watch.cancel()
        self._watch = c.timer.call_repeatedly(WATCH_SECONDS, self.watch)

    def watch(self) -> None:
        if self.admission is not None and self.admission.pipe is not None:
            self.admission.pipe.poll()
        for healer in healers():
            try:
                healer.watch()
            except Exception:
                logger.exception("roger: watching the lease and healing threads failed")

    def shutdown(self, c: Any) -> None:
        if self.healer is not None:
            self.healer.stop()


@signals.worker_shutdown.connect(weak=False, dispatch_uid="celery_roger.worker_shutdown")
def _deregister(**_: Any) -> None:
    """The pool has stopped: give back what this worker holds, without waiting a lease."""
    while (healer := pop_healer()) is not None:
        healer.stop()
        healer.admission.close()
        for request in list(healer.admission.admitted.values()):
            if not request.roger_watch.started:
                # Never started: its message goes back to the broker, so it keeps its
                # queue key; only its execution key is handed on.
                finish_quietly(healer.app, request.id, job_keys(request.request_dict)[0], "",
                               instance=healer.instance)
        try:
            healer.store.renew(healer.instance, deregister=True)
            healer.tick()
        except Exception:
            logger.exception("roger: could not end this worker's lease; it runs out in %ss",
                             healer.lease.lease)


def install_worker_parts(app: Celery) -> None:
    """Register the consumer bootstep on ``app`` (signal receivers are global)."""
    app.steps["consumer"].add(RogerConsumerStep)
    guard_redis_transport()
    guard_fork()
