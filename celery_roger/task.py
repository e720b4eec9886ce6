"""``RogerTask``: the base class that gives a Celery task roger's job semantics."""

from __future__ import annotations

from typing import Any, ClassVar

from celery import Celery, Task

from . import keys
from .publish import UNSET
from .runtime import install


class RogerTask(Task):
    """Base class for roger jobs: ``@app.task(base=RogerTask, queue_key=..., ...)``.

    ``queue_key`` / ``execution_key``: None, a str, or a callable called with the job's
    own arguments (``fn(*args, **kwargs)``) returning a str or None. Subclasses may
    override ``get_queue_key`` / ``get_execution_key`` instead. ``apply_async`` takes
    per-call ``queue_key=`` / ``execution_key=`` that win over the task's own.
    """

    queue_key: ClassVar[Any] = None
    execution_key: ClassVar[Any] = None
    #: What publishing a job whose queue key is held does: "raise" DuplicateJob, or
    #: return the "existing" job's AsyncResult (use it for tasks sent by celery beat).
    on_duplicate: ClassVar[str] = "raise"
    acks_late = True
    Request = "celery_roger.worker:RogerRequest"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Celery turns task options into class attributes, where a plain function would
        # bind as a method; keep key callables as they were given.
        for kind in keys.KINDS:
            spec = cls.__dict__.get(kind)
            if callable(spec) and not isinstance(spec, staticmethod):
                setattr(cls, kind, staticmethod(spec))

    @classmethod
    def on_bound(cls, app: Celery) -> None:
        install(app)

    def get_queue_key(self, *args: Any, **kwargs: Any) -> str | None:
        return keys.compute(self.queue_key, args, kwargs)

    def get_execution_key(self, *args: Any, **kwargs: Any) -> str | None:
        return keys.compute(self.execution_key, args, kwargs)

    def roger_keys(self, args: tuple, kwargs: dict, *, queue_key: Any = UNSET,
                   execution_key: Any = UNSET) -> tuple[str | None, str | None]:
        """The (queue key, execution key) of a job with these arguments, validated."""
        qk = (self.get_queue_key(*args, **kwargs) if queue_key is UNSET
              else keys.compute(queue_key, args, kwargs))
        ek = (self.get_execution_key(*args, **kwargs) if execution_key is UNSET
              else keys.compute(execution_key, args, kwargs))
        return (keys.validate(self.name, "queue_key", qk),
                keys.validate(self.name, "execution_key", ek))

    def apply_async(self, args: Any = None, kwargs: Any = None, task_id: str | None = None,
                    producer: Any = None, link: Any = None, link_error: Any = None,
                    shadow: str | None = None, **options: Any) -> Any:
        app = self._get_app()
        if app.conf.task_always_eager:
            # Eager jobs run inline: keys are validated, but no roger state is touched.
            self.roger_keys(tuple(args or ()), dict(kwargs or {}),
                            queue_key=options.pop("queue_key", UNSET),
                            execution_key=options.pop("execution_key", UNSET))
            options.pop("on_duplicate", None)
        return super().apply_async(args, kwargs, task_id, producer, link, link_error, shadow,
                                   **options)
