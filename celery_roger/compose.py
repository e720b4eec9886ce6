"""``RogerTask`` keeps the app's own task class (issue 15.3).

Celery makes a task of a function with ``type(name, (base,), {"app": app, ...})``
(``Celery._task_from_fun``), so ``@app.task(base=RogerTask)`` would drop the class the app
gives its other tasks (``app.task_cls``): under Django, ``DjangoTask`` and its
``delay_on_commit`` / ``apply_async_on_commit``. ``RogerTaskType``, the metaclass of
``RogerTask``, sees that ``app`` when the task class is made and adds the app's task class
as a further base: ``MyTask -> RogerTask -> <app's task class> -> Task``. An app whose task
class is Celery's plain ``Task`` (any app outside Django, by default) gets exactly the
class it got before.

A class that derives from Django's ``DjangoTask`` (composed so, or written so) also gets
roger's ``delay_on_commit`` / ``apply_async_on_commit`` in front of Django's
(``celery_roger.django``: they take the queue key at call time), loaded only then: a plain
app never imports Django.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task
from kombu.utils.imports import symbol_by_name

logger = logging.getLogger("celery_roger")

DJANGO_TASK = "celery.contrib.django.task.DjangoTask"
ON_COMMIT = "celery_roger.django:RogerOnCommit"


class RogerTaskType(type):
    """The metaclass of ``RogerTask``: composes a task class with its app's task class."""

    def __new__(mcls, name: str, bases: tuple[type, ...], namespace: dict[str, Any],
                **kwargs: Any) -> RogerTaskType:
        composed = with_on_commit((*bases, *app_task_class(namespace.get("app"), bases)))
        if composed != bases:
            try:
                return super().__new__(mcls, name, composed, namespace, **kwargs)
            except TypeError as exc:  # an MRO or metaclass conflict: keep the given bases
                logger.warning("roger: %s keeps its bases %s, without its app's task class "
                               "(%s)", name, [b.__name__ for b in bases], exc)
        return super().__new__(mcls, name, bases, namespace, **kwargs)


def app_task_class(app: Any, bases: tuple[type, ...]) -> tuple[type, ...]:
    """The app's task class, as a further base of a task class of ``bases`` made for
    ``app``: () when it is Celery's plain ``Task``, or already (or more than) a base."""
    if not isinstance(app, Celery):
        return ()
    try:
        task_cls = symbol_by_name(app.task_cls)
    except (ImportError, AttributeError, ValueError) as exc:
        logger.warning("roger: cannot import the app's task class %r: %s", app.task_cls, exc)
        return ()
    if (not isinstance(task_cls, type) or task_cls is Task or not issubclass(task_cls, Task)
            or any(issubclass(b, task_cls) or issubclass(task_cls, b) for b in bases)):
        return ()
    return (task_cls,)


def is_django_task(cls: type) -> bool:
    return any(f"{c.__module__}.{c.__qualname__}" == DJANGO_TASK for c in cls.__mro__)


def with_on_commit(bases: tuple[type, ...]) -> tuple[type, ...]:
    """``bases`` with roger's on-commit methods in front of the first ``DjangoTask``, if
    there is one and they are not there yet."""
    first = next((i for i, b in enumerate(bases) if is_django_task(b)), None)
    if first is None:
        return bases
    on_commit = symbol_by_name(ON_COMMIT)
    if any(issubclass(b, on_commit) for b in bases):
        return bases
    return (*bases[:first], on_commit, *bases[first:])
