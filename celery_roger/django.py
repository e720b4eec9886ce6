"""Roger's ``delay_on_commit`` / ``apply_async_on_commit``, for a ``RogerTask`` that is
also Django's ``DjangoTask`` (compose.py puts them in front of Django's).

Django's own publish the job when the transaction commits, so a duplicate would be refused
(``DuplicateJob``) after the commit, inside Django's on-commit hook, where the caller
cannot catch it. Roger's check the queue key at call time instead, the way a publish on
the long road does (take, publish, confirm):

* at call time, the queue key is taken for a job id chosen now, pending for
  ``roger_publish_grace_seconds``; a duplicate raises ``DuplicateJob`` right there (or
  returns the holder's ``AsyncResult`` with ``on_duplicate="existing"``), and nothing is
  registered;
* on commit, the job is published with that id: the long road's take finds the key held by
  the same job, takes it again, sends, confirms (publish.py ``key_taken``);
* a transaction that rolls back publishes nothing; its key stays pending until the grace
  ends (Django has no on-rollback hook). A transaction that outlasts the grace may lose
  its key to another job: on commit, that publish is refused, logged as an ERROR.

Outside a transaction (autocommit) Django runs the hook at once: the job is published
before the call returns. Both return ``AsyncResult`` of the job id (Django's return None).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from celery.utils import uuid
from django.db import transaction

from .errors import DuplicateJob
from .keys import ON_DUPLICATE
from .publish import UNSET, _duplicate, key_taken
from .runtime import runtime

logger = logging.getLogger("celery_roger")


class RogerOnCommit:
    """``delay_on_commit`` and ``apply_async_on_commit`` that refuse a duplicate at call
    time; the job is published when the transaction commits."""

    def delay_on_commit(self, *args: Any, **kwargs: Any) -> Any:
        """``delay`` when the current transaction commits; the queue key is taken now."""
        return self.apply_async_on_commit(args, kwargs)

    def apply_async_on_commit(self, args: Any = None, kwargs: Any = None,
                              task_id: str | None = None, **options: Any) -> Any:
        """``apply_async`` when the current transaction commits; the queue key is taken
        now (``DuplicateJob`` here). Returns the job's ``AsyncResult`` (its id is chosen
        now), or the holder's with ``on_duplicate="existing"``."""
        return on_commit(self, args, kwargs, task_id, options)


def on_commit(task: Any, args: Any, kwargs: Any, task_id: str | None,
              options: dict[str, Any]) -> Any:
    """Take the job's queue key now, and publish it when the transaction commits."""
    app = task._get_app()
    args, kwargs = tuple(args or ()), dict(kwargs or {})
    task_id = options["task_id"] = task_id or uuid()
    on_duplicate = (options.pop("on_duplicate", None) or task.on_duplicate
                    or runtime(app).settings.on_duplicate)
    if on_duplicate not in ON_DUPLICATE:
        raise ValueError(
            f"{task.name}: on_duplicate must be one of {ON_DUPLICATE}, got {on_duplicate!r}")
    # Computed once: the job is published with the keys checked now.
    qk, ek = task.roger_keys(args, kwargs, queue_key=options.pop("queue_key", UNSET),
                             execution_key=options.pop("execution_key", UNSET))
    options.update(queue_key=qk, execution_key=ek)
    if qk is None or app.conf.task_always_eager:
        # Nothing to take (or an eager job, which touches no roger state).
        transaction.on_commit(functools.partial(task.apply_async, args, kwargs, **options))
        return task.AsyncResult(task_id)
    holder = runtime(app).store.take_queue_key(qk, task_id)
    if holder is not None:
        return _duplicate(app, task, task.name, args, kwargs, options, qk, holder,
                          on_duplicate)
    publish = Publish(task, args, kwargs, options)
    try:
        transaction.on_commit(publish)
    except BaseException:
        if not publish.called:
            # Not registered (a transaction managed by hand): give the key back.
            runtime(app).store.release_queue_key(qk, task_id)
        raise
    return task.AsyncResult(task_id)


class Publish:
    """The on-commit hook of a job whose queue key was taken at call time."""

    def __init__(self, task: Any, args: tuple, kwargs: dict, options: dict[str, Any]) -> None:
        self.task, self.args, self.kwargs, self.options = task, args, kwargs, options
        self.called = False

    def __call__(self) -> None:
        self.called = True
        task, options = self.task, self.options
        with key_taken(options["task_id"]):
            try:
                task.apply_async(self.args, self.kwargs, on_duplicate="raise", **options)
            except DuplicateJob as exc:
                logger.error(
                    "%s[%s]: not published on commit: its queue key %r, taken when "
                    "apply_async_on_commit was called, is now held by job %s (the "
                    "transaction outlasted roger_publish_grace_seconds)", task.name,
                    options["task_id"], exc.queue_key, exc.existing_id)
