"""Keys from a task's name and arguments (issue 15): ``queue_key=True`` and
``keys.args(...)``, bound by the task's signature; the ``roger_on_duplicate`` setting;
the typed per-call options. Pure: no Redis, no broker."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

import celery_roger
from celery_roger import RogerTask, keys
from celery_roger.config import Settings
from celery_roger.errors import ConfigurationError


@pytest.fixture
def app() -> Celery:
    return Celery("kh", set_as_current=False)


def task(app: Celery, fun: Any, **options: Any) -> Any:
    """A task of ``app`` alone (Celery adds a shared task to every app)."""
    options.setdefault("name", f"kh.{fun.__name__}")
    return app.task(base=RogerTask, shared=False, **options)(fun)


def qk(t: Any, *args: Any, **kwargs: Any) -> str | None:
    return t.roger_keys(args, kwargs)[0]


def test_arguments_are_bound_by_signature(app: Celery) -> None:
    def f(a, b): ...

    t = task(app, f, queue_key=True)
    assert qk(t, 1, 2) == qk(t, 1, b=2) == qk(t, a=1, b=2) == qk(t, b=2, a=1) \
        == 'kh.f:{"a":1,"b":2}'
    assert qk(t, 2, 1) != qk(t, 1, 2)


def test_defaults_are_applied_and_empty_var_arguments_left_out(app: Celery) -> None:
    def f(a, b=2, *rest, c=3, **more): ...

    t = task(app, f, queue_key=True)
    assert qk(t, 1) == qk(t, 1, 2) == qk(t, 1, c=3) == 'kh.f:{"a":1,"b":2,"c":3}'
    assert qk(t, 1, 2, 9, z={"y": 1, "x": [1, (2,)]}) == \
        'kh.f:{"a":1,"b":2,"rest":[9],"c":3,"more":{"z":{"x":[1,[2]],"y":1}}}'


def test_dict_values_are_canonical(app: Celery) -> None:
    def f(options): ...

    t = task(app, f, execution_key=True)
    assert t.roger_keys(({"b": 1, "a": "é"},), {}) == \
        (None, 'kh.f:{"options":{"a":"é","b":1}}')
    assert t.roger_keys(({"a": "é", "b": 1},), {})[1] == 'kh.f:{"options":{"a":"é","b":1}}'
    assert t.roger_keys(("\udcff",), {})[1] == 'kh.f:{"options":"\\udcff"}'  # stays UTF-8


def test_chosen_arguments_in_signature_order(app: Celery) -> None:
    def f(account_id, region, full=False): ...

    t = task(app, f, queue_key=keys.args("region", "account_id"))
    assert qk(t, 7, "eu") == qk(t, 7, "eu", full=True) == qk(t, region="eu", account_id=7) \
        == 'kh.f:{"account_id":7,"region":"eu"}'
    def only(x): ...

    only_name = task(app, only, queue_key=keys.args())
    assert qk(only_name, 1) == qk(only_name, 2) == "kh.only:{}"
    assert repr(keys.args("a", "b", "a")) == "keys.args('a', 'b')"


def test_bound_and_class_based_tasks_leave_self_out(app: Celery) -> None:
    @app.task(base=RogerTask, bind=True, name="kh.bound", queue_key=keys.args("a"),
              shared=False)
    def bound(self, a, b=0): ...

    class Sync(RogerTask):
        name = "kh.sync"
        queue_key = True

        def run(self, account):
            return account

    sync = app.register_task(Sync())
    assert qk(bound, 1, 5) == qk(bound, a=1) == 'kh.bound:{"a":1}'
    assert qk(app.tasks["kh.sync"], 3) == qk(sync, account=3) == 'kh.sync:{"account":3}'


def test_the_task_name_keeps_tasks_apart(app: Celery) -> None:
    def one(a): ...

    def two(a): ...

    assert qk(task(app, one, queue_key=True), 1) != qk(task(app, two, queue_key=True), 1)


def test_long_values_are_hashed_keeping_the_name(app: Celery) -> None:
    def f(text): ...

    t = task(app, f, queue_key=True)
    full = f'kh.f:{{"text":"{"x" * 2000}"}}'
    digest = hashlib.blake2b(full.encode(), digest_size=20).hexdigest()
    assert qk(t, "x" * 2000) == f"kh.f:blake2b:{digest}"
    assert qk(t, "x" * 2000) != qk(t, "x" * 2001)
    room = keys.MAX_KEY_BYTES - len('kh.f:{"text":""}')
    assert qk(t, "y" * room) == f'kh.f:{{"text":"{"y" * room}"}}'  # 1024 bytes: as it is
    assert qk(t, "y" * (room + 1)).startswith("kh.f:blake2b:")
    assert qk(t, "é" * 600).startswith("kh.f:blake2b:")  # counted in UTF-8 bytes


def test_per_call_forms(app: Celery) -> None:
    def f(a, b=1): ...

    t = task(app, f, queue_key="fixed")
    assert t.roger_keys((1,), {}, queue_key=True, execution_key=keys.args("b")) == \
        ('kh.f:{"a":1,"b":1}', 'kh.f:{"b":1}')
    assert t.roger_keys((1,), {}, queue_key=False) == (None, None)
    with pytest.raises(TypeError, match=r"kh\.f: queue_key=keys\.args\(\.\.\.\) names "
                                        r"argument 'c'"):
        t.roger_keys((1,), {}, queue_key=keys.args("c"))


def test_strings_and_callables_are_unchanged(app: Celery) -> None:
    def f(a, b=1): ...

    t = task(app, f, queue_key=lambda a, b=1: f"k{a}", execution_key="e")
    assert t.roger_keys((1,), {}) == ("k1", "e")
    assert task(app, f, name="kh.none").roger_keys((1,), {}) == (None, None)


def test_unknown_argument_is_an_error_at_declaration(app: Celery) -> None:
    def f(account_id): ...

    task(app, f, execution_key=keys.args("acount_id"))
    # When Celery creates the task: at once on a finalized app, else when it finalizes.
    with pytest.raises(TypeError, match=r"kh\.f: execution_key=keys\.args\(\.\.\.\) names "
                                        r"argument 'acount_id'"):
        app.finalize()
    with pytest.raises(TypeError, match="takes argument names"):
        keys.args("a", 2)  # type: ignore[arg-type]


@pytest.mark.parametrize(("value", "kind"), [
    (object(), "object"), ({1, 2}, "set"), (b"raw", "bytes"), ({"a": 1, 2: 3}, "dict"),
])
def test_values_json_cannot_encode_name_the_task_and_argument(app: Celery, value: Any,
                                                              kind: str) -> None:
    def f(a, payload): ...

    t = task(app, f, queue_key=True)
    with pytest.raises(TypeError, match=rf"kh\.f: argument 'payload' \({kind}\) cannot be "
                                        r"part of a key"):
        qk(t, 1, value)
    t2 = task(app, f, name="kh.f2", queue_key=keys.args("a"))
    assert qk(t2, 1, value) == 'kh.f2:{"a":1}'  # left out: fine


def test_arguments_that_do_not_fit_the_signature(app: Celery) -> None:
    def f(a): ...

    t = task(app, f, queue_key=True)
    with pytest.raises(TypeError, match=r"kh\.f: the arguments do not fit"):
        qk(t, 1, 2)


def test_on_duplicate_setting_is_validated_and_is_the_default(app: Celery) -> None:
    app.conf.roger_on_duplicate = "existing"
    assert Settings.from_app(app).on_duplicate == "existing"
    assert Settings.from_app(Celery("other", set_as_current=False)).on_duplicate == "raise"
    for bad in ("ignore", 1, ["raise"]):
        app.conf.roger_on_duplicate = bad
        with pytest.raises(ConfigurationError, match="setting roger_on_duplicate must be one "
                                                     r"of \('raise', 'existing', 'replace'\)"):
            Settings.from_app(app)
    assert RogerTask.on_duplicate is None  # a task that says nothing follows the setting
    def e(): ...

    assert task(app, e, on_duplicate="existing").on_duplicate == "existing"


SNIPPET = '''
from celery_roger import RogerTask, keys


def publish(task: RogerTask) -> None:
    task.apply_async((1,), queue_key=keys.args("a"), on_duplicate="existing")
    task.apply_async((1,), queue_key=True, execution_key=None)
    task.apply_async((1,), queue_key=lambda a: f"k{a}", execution_key="e", countdown=3)
    task.apply_async((1,), on_duplicate="existng")
    task.apply_async((1,), queue_key=42)
'''


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is not installed")
def test_per_call_options_are_typed(tmp_path: Path) -> None:
    """mypy checks ``on_duplicate`` and the keys given to ``apply_async``."""
    (tmp_path / "snippet.py").write_text(textwrap.dedent(SNIPPET))
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "--cache-dir", str(tmp_path / "c"),
         "--ignore-missing-imports", "--config-file", "", "snippet.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "MYPYPATH": str(Path(celery_roger.__file__).parents[1])})
    errors = [line for line in out.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 2, out.stdout + out.stderr
    assert "snippet.py:9:" in errors[0] and '"on_duplicate"' in errors[0]
    assert "snippet.py:10:" in errors[1] and '"queue_key"' in errors[1]


def test_a_rate_is_checked_where_it_is_declared(app: Celery) -> None:
    def crawl(url: str) -> None: ...

    for bad, error in (("5/d", ValueError), ("0/s", ValueError), (10, TypeError)):
        with pytest.raises(error, match=r"kh\.crawl: rate must be"):
            _ = task(app, crawl, rate=bad).name  # Celery makes the class on first use
    rated = task(app, crawl, name="kh.rated", rate="100/m")
    assert rated.roger_rate(("u",), {}) == ("kh.rated", (100, 60_000))
    keyed = task(app, crawl, name="kh.keyed", rate="3/s", rate_key=keys.args("url"))
    assert keyed.roger_rate(("a",), {}) == ('kh.keyed:{"url":"a"}', (3, 1000))
    assert keyed.roger_rate(("a",), {}, rate="7/h")[1] == (7, 3_600_000)
    assert task(app, crawl, name="kh.none").roger_rate(("a",), {}) is None
    assert keys.rate_text(100, 60_000) == "100/m" and keys.rate_text(3, 1500) == "3/1500ms"
