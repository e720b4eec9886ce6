"""Tasks of tests/test_migration_keys.py: keys as celery-once and celery-singleton users
know them (the task's name and its arguments). On roger_app's app: a worker of the tests
imports this module through the ``imports`` setting (ROGER_TEST_SETTINGS)."""

from __future__ import annotations

from roger_app import app, record

from celery_roger import RogerTask, keys


@app.task(base=RogerTask, queue_key=True)
def total(run: str, a: int, b: int = 0) -> int:
    """Keyed on its name and all its arguments."""
    record(run, "total", a=a, b=b)
    return a + b


@app.task(base=RogerTask, queue_key=True)
def difference(run: str, a: int, b: int = 0) -> int:
    """Same arguments as ``total``, another task: another key."""
    return a - b


@app.task(base=RogerTask, bind=True, queue_key=keys.args("run", "account"))
def sync(self: RogerTask, run: str, account: int, full: bool = False) -> int:
    """Keyed on its name and two of its arguments (``self`` is not one of them)."""
    return account


@app.task(base=RogerTask, queue_key=True, on_duplicate="raise")
def strict(run: str, a: int) -> int:
    """Says ``on_duplicate="raise"`` itself: the setting does not change it."""
    return a
