"""Roger's five callbacks as Celery-style signals.

Connect a receiver like any Celery signal::

    from celery_roger import signals

    @signals.on_buried.connect
    def page_someone(sender, partition, job, error, traceback, state, **kw): ...

``sender`` is the task. The keyword arguments are those of the matching callback in
``roger_callbacks`` (see celery_roger.callbacks). A receiver that raises is logged with
the job id and changes nothing.
"""

from __future__ import annotations

from celery.utils.dispatch import Signal

before_run = Signal(name="roger.before_run")
after_run = Signal(name="roger.after_run")
on_error = Signal(name="roger.on_error")
on_cancel = Signal(name="roger.on_cancel")
on_buried = Signal(name="roger.on_buried")

__all__ = ["after_run", "before_run", "on_buried", "on_cancel", "on_error"]
