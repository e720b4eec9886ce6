"""The ``roger_*`` settings, read from ``app.conf`` the way Celery reads its own."""

from __future__ import annotations

import contextlib
import functools
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from celery.utils.text import match_case

from .errors import ConfigurationError
from .keys import ON_DUPLICATE

DEFAULT_RETRY_LEVELS = (1, 3, 5, 10, 20, 35, 60, 100, 200, 400, 1000, 1800)

_MISSING = object()


def _lookup(app: Celery, name: str) -> Any:
    """A setting by its lowercase name, its uppercase name or Django's ``CELERY_`` form."""
    conf = app.conf
    for candidate in (name, name.upper(), "CELERY_" + name.upper()):
        value = conf.get(candidate, _MISSING)
        if value is not _MISSING:
            return value
    return _MISSING


def setting_name(app: Celery, name: str) -> str:
    """A ``roger_*`` setting's name as the user wrote it: the key its value is read from
    (``CELERY_ROGER_RETRY_LEVELS`` from Django's settings with ``namespace="CELERY"``), else
    the name the app's namespace asks for."""
    _lookup(app, name)  # loads the configuration: its prefix is known from then on
    conf = app.conf
    prefix = getattr(conf, "prefix", None) or (f"{app.namespace}_" if app.namespace else "")
    candidates = []
    for key in (name, name.upper(), "CELERY_" + name.upper()):
        if prefix:  # as Celery's ConfigurationView looks a key up under a namespace
            candidates.append(key if key.startswith(prefix) else match_case(prefix + key,
                                                                            prefix))
        candidates.append(key)
    maps = getattr(conf, "maps", None) or [conf]
    found = next((key for key in candidates if any(key in m for m in maps)), None)
    return found or candidates[0]


def _written(app: Celery, message: str) -> str:
    """A settings error's message with the setting it starts with named as written."""
    return _LEADING_NAME.sub(lambda m: (m[1] or "") + setting_name(app, m[2]), message, count=1)


_LEADING_NAME = re.compile(r"^(setting )?(roger_[a-z0-9_]+)")


@contextlib.contextmanager
def as_written(app: Celery) -> Iterator[None]:
    """A ``ConfigurationError`` raised in this block names its setting as the user wrote
    it (``roger_retry_levels`` becomes ``CELERY_ROGER_RETRY_LEVELS`` under Django)."""
    try:
        yield
    except ConfigurationError as exc:
        if exc.args and isinstance(exc.args[0], str):
            exc.args = (_written(app, exc.args[0]), *exc.args[1:])
        raise


def _number(name: str, value: Any, *, minimum: float, integer: bool = False) -> float:
    ok_types = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_types) or not math.isfinite(value):
        kind = "an integer" if integer else "a number"
        raise ConfigurationError(f"setting {name} must be {kind}, got {value!r}")
    if value < minimum:
        raise ConfigurationError(f"setting {name} must be >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class Settings:
    redis_url: str
    partition: str
    callbacks: Any
    retry_levels: tuple[float, ...]
    lease_seconds: float
    cancel_ttl: float
    buried_max: int
    dashboard_token: str | None = field(repr=False)
    publish_grace_seconds: float
    redis_client: Any = None
    #: A confirmed queue key whose job is nowhere is released after this long (0: never).
    orphaned_key_seconds: float = 120.0
    dashboard_allowed_hosts: tuple[str, ...] | None = None
    #: Labelled dashboard tokens (``roger_dashboard_tokens``): (label, token) pairs.
    dashboard_tokens: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    #: How long each job's history is kept, in seconds (0: not kept).
    history_ttl: float = 86400.0
    #: Publish with a queue key in one script on a Redis broker that is roger's database.
    fused_publish: bool = True
    #: Admission sends its script from the worker's event loop without waiting (pipe.py):
    #: opt-in while a stuck rated job seen once under load in CI is not explained.
    pipelined_admission: bool = False
    #: What a publish whose queue key is held does when neither the call nor the task says.
    on_duplicate: str = "raise"

    @classmethod
    def from_app(cls, app: Celery) -> Settings:
        """The app's settings; an error names the setting as the user wrote it."""
        with as_written(app):
            return cls._read(app)

    @classmethod
    def _read(cls, app: Celery) -> Settings:
        def get(name: str, default: Any) -> Any:
            value = _lookup(app, name)
            return default if value is _MISSING or value is None else value

        redis_url = get("roger_redis_url", None) or _default_redis_url(app)
        if not isinstance(redis_url, str) or not redis_url.startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ConfigurationError(
                "setting roger_redis_url must be a redis://, rediss:// or unix:// URL, "
                f"got {redact_url(redis_url)!r}"
            )
        partition = get("roger_partition", "default")
        if not isinstance(partition, str) or not partition or "{" in partition or "}" in partition:
            raise ConfigurationError(
                "setting roger_partition must be a non-empty string without braces, "
                f"got {partition!r}"
            )
        levels = get("roger_retry_levels", DEFAULT_RETRY_LEVELS)
        return cls(
            redis_url=redis_url,
            partition=partition,
            callbacks=get("roger_callbacks", None),
            retry_levels=retry_levels("roger_retry_levels", levels),
            lease_seconds=_number("roger_lease_seconds", get("roger_lease_seconds", 30), minimum=2),
            cancel_ttl=_number("roger_cancel_ttl", get("roger_cancel_ttl", 604800), minimum=1),
            buried_max=int(
                _number("roger_buried_max", get("roger_buried_max", 10000), minimum=1, integer=True)
            ),
            dashboard_token=dashboard_token(get("roger_dashboard_token", None)),
            publish_grace_seconds=_number(
                "roger_publish_grace_seconds", get("roger_publish_grace_seconds", 60), minimum=1
            ),
            redis_client=redis_client(get("roger_redis_client", None)),
            orphaned_key_seconds=_number(
                "roger_orphaned_key_seconds", get("roger_orphaned_key_seconds", 120), minimum=0
            ),
            dashboard_allowed_hosts=dashboard_allowed_hosts(
                get("roger_dashboard_allowed_hosts", None)),
            dashboard_tokens=dashboard_tokens(get("roger_dashboard_tokens", None)),
            history_ttl=_number("roger_history_ttl", get("roger_history_ttl", 86400), minimum=0),
            fused_publish=_flag("roger_fused_publish", get("roger_fused_publish", True)),
            pipelined_admission=_flag("roger_pipelined_admission",
                                      get("roger_pipelined_admission", False)),
            on_duplicate=_choice("roger_on_duplicate", get("roger_on_duplicate", "raise"),
                                 ON_DUPLICATE),
        )


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigurationError(f"setting {name} must be True or False, got {value!r}")
    return value


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices or not isinstance(value, str):
        raise ConfigurationError(f"setting {name} must be one of {choices}, got {value!r}")
    return value


def import_setting(name: str, path: str) -> Any:
    """The object a setting names by its dotted path; an error naming the setting."""
    from kombu.utils.imports import symbol_by_name

    try:
        return symbol_by_name(path)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigurationError(f"setting {name}: cannot import {path!r}: {exc}") from exc


def redis_client(value: Any) -> Any:
    """``roger_redis_client``: a callable (or its dotted path) that returns the Redis
    client roger uses, for Sentinel or Cluster; None means ``roger_redis_url``."""
    if value is None:
        return None
    if isinstance(value, str):
        value = import_setting("roger_redis_client", value)
    if not callable(value):
        raise ConfigurationError(
            f"setting roger_redis_client must be a callable returning a Redis client, "
            f"or its dotted path, got {value!r}"
        )
    return value


def dashboard_token(value: Any, name: str = "roger_dashboard_token") -> str | None:
    """``roger_dashboard_token``: a string (empty or None: the dashboard is read-only).
    The error names the type only, never the value: it is a secret."""
    if value is None or isinstance(value, str):
        return value
    raise ConfigurationError(
        f"setting {name} must be a string, got a value of type {type(value).__name__}"
    )


def dashboard_tokens(value: Any, name: str = "roger_dashboard_tokens"
                     ) -> tuple[tuple[str, str], ...]:
    """``roger_dashboard_tokens``: ``{"alice": "<token>", "deploy-bot": "<token>"}``, each
    label (1 to 64 printable characters) naming who acts in the audit log. Errors name the
    label, never a token."""
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise ConfigurationError(f"setting {name} must be a dict of label -> token, got a "
                                 f"value of type {type(value).__name__}")
    pairs = []
    for label, token in value.items():
        if not isinstance(label, str) or not 1 <= len(label) <= 64 or not label.isprintable():
            raise ConfigurationError(f"setting {name}: label {label!r:.80} must be a str of "
                                     "1 to 64 printable characters")
        if not isinstance(token, str) or not token:
            raise ConfigurationError(f"setting {name}: the token of {label!r} must be a "
                                     "non-empty str")
        pairs.append((label, token))
    if len({token for _, token in pairs}) < len(pairs):
        raise ConfigurationError(f"setting {name}: two labels share one token; each label "
                                 "needs its own, or the audit log cannot tell them apart")
    return tuple(pairs)


def dashboard_allowed_hosts(value: Any, name: str = "roger_dashboard_allowed_hosts"
                            ) -> tuple[str, ...] | None:
    """``roger_dashboard_allowed_hosts``: a list of host names (``host`` or ``host:port``;
    ``"*"`` allows any) the dashboard answers; None or empty: its defaults."""
    if value is None:
        return None
    if (isinstance(value, (str, bytes)) or not isinstance(value, Sequence)
            or not all(isinstance(h, str) and h.strip() for h in value)):
        raise ConfigurationError(
            f'setting {name} must be a list of host names ("*" allows any), got {value!r}'
        )
    return tuple(h.strip() for h in value) or None


def retry_levels(name: str, value: Any) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ConfigurationError(f"{name} must be a list of seconds, got {value!r}")
    return tuple(_number(name, level, minimum=0) for level in value)


def _default_redis_url(app: Celery) -> str:
    broker = app.conf.broker_url or ""
    if isinstance(broker, str) and broker.startswith(("redis://", "rediss://")):
        return broker.split(";")[0]
    return "redis://localhost:6379/0"


def redact_url(url: Any) -> Any:
    """The URL with any password replaced (before its ``@``, or a ``password=`` query
    parameter, as redis-py reads it), for error messages and logs."""
    if not isinstance(url, str):
        return url
    scheme, sep, rest = url.partition("://")
    location, qsep, query = rest.partition("?")
    if "@" in location:
        creds, _, host = location.rpartition("@")
        user = creds.split(":", 1)[0]
        location = f"{user + ':' if user else ''}***@{host}"
    query = re.sub(r"(^|&)password=[^&]*", r"\1password=***", query)
    return f"{scheme}{sep}{location}{qsep}{query}"


def hide_in_reports() -> None:
    """Have ``celery report`` and ``celery inspect conf`` hide the password of
    ``roger_redis_url``, as Celery does for its broker and backend URLs (idempotent)."""
    from celery.app import utils

    original = utils.filter_hidden_settings
    if getattr(original, "roger", False):
        return

    @functools.wraps(original)
    def filter_hidden_settings(conf: Any) -> Any:
        return {key: redact_url(value) if isinstance(key, str)
                and key.lower().endswith("roger_redis_url") else value
                for key, value in original(conf).items()}

    filter_hidden_settings.roger = True  # type: ignore[attr-defined]
    utils.filter_hidden_settings = filter_hidden_settings


# On import: `celery report` may print the settings before any task is bound to its app.
hide_in_reports()
