"""Resolving and validating queue keys and execution keys.

A key spec (a task option, or a per-call ``queue_key=`` / ``execution_key=``) is:

* ``None`` or ``False``: no key; a ``str``: that key; a callable: ``fn(*args, **kwargs)``
  returns the key (a ``str`` or None);
* ``True``: the task's name and all its arguments (``keys.args()`` of every parameter);
* ``keys.args("a", "b")``: the task's name and the arguments named.

``True`` and ``keys.args`` bind the call's arguments through the signature of the task's
``run`` (defaults applied, a bound task's ``self`` left out), so ``f(1, 2)``,
``f(1, b=2)`` and ``f(a=1, b=2)`` give one key: ``<task name>:<JSON object>``, the
arguments in signature order, each value as canonical JSON (dict keys sorted, no spaces).
A key over :data:`MAX_KEY_BYTES` is ``<task name>:blake2b:<40 hex digits>`` of that form.
A value JSON cannot encode is an error naming the task and the argument (never ``repr``:
it is not stable across processes for most objects).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
from collections.abc import Callable
from typing import Any, Literal

MAX_KEY_BYTES = 1024

KINDS = ("queue_key", "execution_key", "rate_key")

#: What publishing a job whose queue key is held does (task option, per call, setting).
ON_DUPLICATE = ("raise", "existing", "replace")
OnDuplicate = Literal["raise", "existing", "replace"]


class Arguments:
    """A key built from the task's name and the arguments named (all of them for None);
    made by :func:`args` (or ``True``)."""

    __slots__ = ("names",)

    def __init__(self, names: tuple[str, ...] | None) -> None:
        self.names = names

    def __repr__(self) -> str:
        return "True" if self.names is None else f"keys.args{self.names!r}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Arguments) and other.names == self.names

    def __hash__(self) -> int:
        return hash(self.names)


#: A key spec as a type checker sees it.
KeySpec = str | bool | None | Callable[..., str | None] | Arguments


def args(*names: str) -> Arguments:
    """A key of the task's name and these arguments, bound by the task's signature:
    ``queue_key=keys.args("account_id", "region")``. With no names: the task's name
    alone (one job of the task at a time, whatever its arguments)."""
    for name in names:
        if not isinstance(name, str) or not name.isidentifier():
            raise TypeError(f"keys.args() takes argument names, got {name!r}")
    return Arguments(tuple(dict.fromkeys(names)))


_ALL = Arguments(None)


def compute(spec: Any, args: tuple, kwargs: dict, task: Any = None,
            kind: str = "key") -> Any:
    """The key a task option or per-call value ``spec`` gives a job with these arguments
    (``task``: the task, for ``True`` and ``keys.args``)."""
    if callable(spec):
        return spec(*args, **kwargs)
    if spec is True or isinstance(spec, Arguments):
        return from_arguments(task, spec, args, kwargs, kind)
    return None if spec is False else spec


def run_signature(cls: type) -> inspect.Signature | None:
    """The signature a job of task class ``cls`` is called with (its ``run`` without a
    bound ``self``), cached on the class; None if ``cls`` has no ``run`` of its own kind."""
    cached = cls.__dict__.get("_roger_run_signature")
    if cached is not None:
        return cached
    raw = inspect.getattr_static(cls, "run", None)
    if raw is None:
        return None
    if isinstance(raw, staticmethod):
        signature = inspect.signature(raw.__func__)
    elif isinstance(raw, classmethod):
        signature = inspect.signature(raw.__get__(None, cls))
    else:
        signature = inspect.signature(raw)
        params = list(signature.parameters.values())
        if inspect.isfunction(raw) and params and params[0].kind in (
                params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
            signature = signature.replace(parameters=params[1:])  # the task itself
    setattr(cls, "_roger_run_signature", signature)  # noqa: B010 (not on every Task)
    return signature


def check_names(label: str, kind: str, spec: Any, signature: inspect.Signature) -> None:
    """A ``keys.args`` name that ``signature`` lacks is a TypeError naming both."""
    if isinstance(spec, Arguments) and spec.names:
        for name in spec.names:
            if name not in signature.parameters:
                raise TypeError(
                    f"{label}: {kind}=keys.args(...) names argument {name!r}, which is not "
                    f"in the task's signature {signature}"
                )


def check_declaration(cls: type, label: str, has_run: bool) -> None:
    """At task declaration: the ``keys.args`` names of ``cls``'s key options are in its
    ``run``'s signature (``has_run``: ``cls`` has a ``run`` of its own, not Celery's)."""
    for kind in KINDS:
        spec = getattr(cls, kind, None)
        if has_run and (spec is True or isinstance(spec, Arguments)):
            signature = run_signature(cls)
            if signature is not None:
                check_names(label, kind, spec, signature)


def from_arguments(task: Any, spec: Any, args: tuple, kwargs: dict,
                   kind: str = "key") -> str:
    """``<task name>:<canonical JSON of the chosen arguments>`` (hashed when too long)."""
    name = task.name
    signature = run_signature(type(task))
    if signature is None:
        raise TypeError(f"{name}: {kind} from arguments needs the task's run function")
    chosen = _ALL if spec is True else spec
    check_names(name, kind, chosen, signature)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise TypeError(f"{name}: the arguments do not fit the task's signature "
                        f"{signature}, so no {kind} can be built from them: {exc}") from None
    bound.apply_defaults()
    values = bound.arguments
    names = [p for p, param in signature.parameters.items() if p in chosen.names] \
        if chosen.names is not None else [
            p for p, param in signature.parameters.items()  # an empty *args/**kw left out
            if param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or values[p]]
    body = ",".join(f"{json.dumps(p)}:{canonical(name, p, values[p])}" for p in names)
    key = f"{name}:{{{body}}}"
    data = key.encode("utf-8", errors="surrogatepass")
    if len(data) <= MAX_KEY_BYTES:
        return key
    return f"{name}:blake2b:{hashlib.blake2b(data, digest_size=20).hexdigest()}"


def canonical(task_name: str, argument: str, value: Any) -> str:
    """``value`` as canonical JSON; a value JSON cannot encode is a TypeError naming the
    task and the argument."""
    try:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"{task_name}: argument {argument!r} ({type(value).__name__}) cannot be part of a "
            f"key built from arguments: its value is not JSON ({exc}); leave it out with "
            f"keys.args(...) or write the key as a callable"
        ) from None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: keep them escaped, the key stays UTF-8
        text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return text


def validate(task_name: str, kind: str, value: Any) -> str | None:
    """``value`` if it is a valid key (or None); else a TypeError/ValueError naming both."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(
            f"{task_name}: {kind} must be a str or None, got {type(value).__name__} {value!r}"
        )
    if not value:
        raise ValueError(f"{task_name}: {kind} must not be an empty string")
    size = len(value.encode("utf-8", errors="surrogatepass"))
    if size > MAX_KEY_BYTES:
        raise ValueError(
            f"{task_name}: {kind} is {size} bytes of UTF-8, more than the {MAX_KEY_BYTES} allowed"
            f" ({value[:40]!r}...)"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{task_name}: {kind} is not valid UTF-8 text ({exc.reason})") from None
    if kind == "execution_key" and "\x00" in value:
        # NUL separates a key from its slot number (execution_limit, lib.lua).
        raise ValueError(f"{task_name}: {kind} must not contain NUL ({value[:40]!r})")
    return value


#: queue_key_until's words; otherwise it is a number of seconds (a throttle window).
UNTIL = ("end", "start")


def queue_key_until(task_name: str, value: Any) -> str | float:
    """A valid ``queue_key_until``: "end" (released when the attempt ends), "start" (as
    it starts) or seconds > 0 (a throttle window from the accepted publish, as a float);
    else a TypeError/ValueError naming the task and the option."""
    if isinstance(value, str):
        if value in UNTIL:
            return value
        raise ValueError(f"{task_name}: queue_key_until must be 'end', 'start' or a number "
                         f"of seconds > 0, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{task_name}: queue_key_until must be 'end', 'start' or a number "
                        f"of seconds > 0, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{task_name}: queue_key_until must be a number of seconds > 0, "
                         f"got {value!r}")
    return float(value)


#: What separates an execution key from its slot number in roger's ``holders`` (lib.lua).
SLOT_SEPARATOR = "\x00#"


def base_key(slot: str) -> str:
    """The execution key of a slot name (``E``, or ``E\\0#i`` for slot i > 1)."""
    return slot.split(SLOT_SEPARATOR, 1)[0]


def slot_name(key: str, number: int) -> str:
    """The name of slot ``number`` of execution key ``key`` in ``holders``."""
    return key if number == 1 else f"{key}{SLOT_SEPARATOR}{number}"


def slot_number(slot: str) -> int:
    """The slot number of a slot name (1 for the key itself)."""
    _, _, number = slot.partition(SLOT_SEPARATOR)
    return int(number) if number.isdigit() else 1


def execution_limit(task_name: str, value: Any) -> int:
    """A valid ``execution_limit``: an int >= 1; else a TypeError/ValueError naming the
    task and the option."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{task_name}: execution_limit must be an int >= 1, got "
                        f"{type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{task_name}: execution_limit must be an int >= 1, got {value!r}")
    return value


#: A rate's window in milliseconds, by its unit (Celery's rate syntax: "N/s", "N/m", "N/h").
RATE_UNITS = {"s": 1000, "m": 60_000, "h": 3_600_000}


def rate(task_name: str, value: Any) -> tuple[int, int] | None:
    """A valid ``rate`` as (starts, window in ms): ``"N/s"``, ``"N/m"`` or ``"N/h"`` with
    N an int >= 1 (None: no rate); else a TypeError/ValueError naming the task and the
    option."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{task_name}: rate must be a str like '10/s', '100/m' or '1000/h', "
                        f"got {type(value).__name__} {value!r}")
    count, _, unit = value.strip().partition("/")
    if not count.strip().isdigit() or unit.strip() not in RATE_UNITS or int(count) < 1:
        raise ValueError(f"{task_name}: rate must be 'N/s', 'N/m' or 'N/h' with N an int "
                         f">= 1, got {value!r}")
    return int(count), RATE_UNITS[unit.strip()]


def rate_text(starts: int, window_ms: int) -> str:
    """A rate as its users write it ("100/m"), or in ms when its window is not a unit."""
    for unit, ms in RATE_UNITS.items():
        if ms == window_ms:
            return f"{starts}/{unit}"
    return f"{starts}/{window_ms}ms"
