"""The base of roger's Redis layer: the client, the Lua scripts (lib.lua's shared helpers
prepended to each), the key names of one partition, and the poison-proofing every
reader goes through. See store.py for the transitions.

Every key lives under ``roger:{<partition>}:``. The braces are a Redis Cluster hash
tag: all state of one partition sits in one slot, so each Lua script touches one slot.
See docs/design.md for the layout and the life of a job.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis

from .config import Settings, redact_url
from .records import kombu_loads, preview, text

logger = logging.getLogger("celery_roger")

#: The version of roger's key names (migrate.lua moves older state to them).
SCHEMA_VERSION = 2
_LUA = resources.files("celery_roger").joinpath("lua")
#: Prepended to scripts, not scripts themselves.
_PRELUDES = ("clock.lua", "lib.lua")


@dataclass(frozen=True)
class Script:
    """One Lua script: its name, the names of its KEYS and ARGV (declared by its first two
    lines, ``--! KEYS: a b`` and ``--! ARGV: x y``, ``...`` for a variadic ARGV), and the
    source Redis runs: clock.lua, lib.lua's shared helpers, the check of its keys' types
    (``guard_keys``), the named locals ``K.<key>`` and ``A.<argument>``, then the script.
    A script marked ``--! LEAN`` gets only the clock and the locals. ``sha``: what
    EVALSHA names it by."""

    name: str
    keys: tuple[str, ...]
    args: tuple[str, ...]
    source: str
    sha: str

    @classmethod
    def load(cls, name: str, clock: str, lib: str) -> Script:
        text = _LUA.joinpath(f"{name}.lua").read_text(encoding="utf-8")
        declared = dict(re.findall(r"^--! (KEYS|ARGV):(.*)$", text, flags=re.M))
        if set(declared) != {"KEYS", "ARGV"}:
            raise RuntimeError(f"{name}.lua does not declare its KEYS and ARGV")
        keys, args = tuple(declared["KEYS"].split()), tuple(declared["ARGV"].split())
        locals_ = (
            "local K = {" + ", ".join(f"{k} = KEYS[{i}]" for i, k in enumerate(keys, 1)) + "}\n"
        )
        if args != ("...",):
            locals_ += (
                "local A = {"
                + ", ".join(f"{a} = ARGV[{i}]" for i, a in enumerate(args, 1))
                + "}\n"
            )
        if re.search(r"^--! LEAN$", text, flags=re.M):
            # A hot script that does without lib.lua and its key-type guard: its caller
            # falls back to a guarded script when Redis answers with an error.
            source = clock + locals_ + text
        else:
            source = clock + used_parts(lib, text) + "\nguard_keys()\n" + locals_ + text
        return cls(name, keys, args, source, hashlib.sha1(source.encode("utf-8")).hexdigest())


#: A top-level definition of lib.lua: ``local function name(`` or ``local NAME =``.
_DEFINITION = re.compile(r"^local (?:function )?(\w+)", flags=re.M)


def used_parts(lib: str, script: str) -> str:
    """lib.lua's definitions that ``script`` uses (``guard_keys`` always), with those they
    use in turn, in lib.lua's order: Redis runs a script's whole text on every call, so a
    helper no script of this kind needs would cost each call its definition."""
    starts = [m.start() for m in _DEFINITION.finditer(lib)]
    parts = {
        _DEFINITION.match(lib, a).group(1): lib[a:b]  # type: ignore[union-attr]
        for a, b in zip(starts, [*starts[1:], len(lib)], strict=True)
    }
    needed: set[str] = set()
    pending = [script, "guard_keys()"]
    while pending:
        body = pending.pop()
        for name, part in parts.items():
            if name not in needed and re.search(rf"\b{name}\b", body):
                needed.add(name)
                pending.append(part)
    return "".join(part for name, part in parts.items() if name in needed)


def _load_scripts() -> dict[str, Script]:
    clock, lib = (_LUA.joinpath(n).read_text(encoding="utf-8") for n in _PRELUDES)
    names = sorted(
        p.name[:-4] for p in _LUA.iterdir() if p.name.endswith(".lua") and p.name not in _PRELUDES
    )
    return {name: Script.load(name, clock, lib) for name in names}


SCRIPTS = _load_scripts()


class StoreBase:
    """Roger state of one partition in one Redis: client, scripts, key names."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.partition = settings.partition
        self.prefix = f"roger:{{{settings.partition}}}:"
        if settings.redis_client is not None:
            # Sentinel or Cluster: the user's own client (every script's keys share the
            # partition's hash tag, so each script runs on one Cluster slot).
            self.redis = settings.redis_client()
        else:
            self.redis = redis.Redis.from_url(
                settings.redis_url,
                socket_timeout=5,
                socket_connect_timeout=5,
                health_check_interval=30,
                retry_on_timeout=False,
            )
        self.lease_ms = int(settings.lease_seconds * 1000)
        self.grace_ms = int(settings.publish_grace_seconds * 1000)
        # The partition's own keys (docs/design.md has a row for each); Lua scripts name
        # them the same (``K.<name>``), and ``_run`` fills them in by that name.
        self.k_workers = self.prefix + "workers"
        self.k_running = self.prefix + "running"
        self.k_holders = self.prefix + "holders"
        self.k_slots = self.prefix + "slots"
        self.k_limits = self.prefix + "limits"
        self.k_msg = self.prefix + "msg"
        self.k_promoting = self.prefix + "promoting"
        self.k_qkeys = self.prefix + "qkeys"
        self.k_qk_pending = self.prefix + "qk_pending"
        self.k_qk_until = self.prefix + "qk_until"
        self.k_retry = self.prefix + "retry"
        self.k_retry_msg = self.prefix + "retry_msg"
        self.k_buried = self.prefix + "buried"
        self.k_buried_msg = self.prefix + "buried_msg"
        self.k_buried_dropped = self.prefix + "buried_dropped"
        self.k_buried_queues = self.prefix + "buried_queues"
        self.k_cancelled = self.prefix + "cancelled"
        self.k_cancel_reported = self.prefix + "cancel_reported"
        self.k_cancel_reports = self.prefix + "cancel_reports"
        self.k_paused = self.prefix + "paused"
        self.k_held_msg = self.prefix + "held_msg"
        self.k_held_queues = self.prefix + "held_queues"
        self.k_parked_count = self.prefix + "parked_count"
        self.k_stats = self.prefix + "stats"
        self.k_crash_checks = self.prefix + "crash_checks"
        self.k_crash_info = self.prefix + "crash_info"
        self.k_quarantine = self.prefix + "quarantine"
        self.k_quarantine_log = self.prefix + "quarantine_log"
        self.k_orphan_suspects = self.prefix + "orphan_suspects"
        self.k_orphan_suspect_keys = self.prefix + "orphan_suspect_keys"
        self.k_sweep = self.prefix + "sweep"
        self.k_schema = self.prefix + "schema"
        self.k_fuse = self.prefix + "fuse"
        self.k_rate_due = self.prefix + "rate_due"
        self.k_rate_limits = self.prefix + "rate_limits"
        self.k_qk_prev = self.prefix + "qk_prev"
        self.k_unused = self.prefix + "unused"  # a key a call will not touch (used_keys)
        self.cancel_ttl_ms = int(settings.cancel_ttl * 1000)
        #: whether this partition's key names are known to be this version's (migrate)
        self.migrated = False

    def _run(
        self,
        name: str,
        args: dict[str, Any] | None = None,
        *,
        keys: dict[str, str] | None = None,
        rest: list[Any] | None = None,
        client: Any = None,
    ) -> Any:
        """Run Lua script ``name`` with its keys and arguments by name: a key the caller
        does not give is this partition's key of that name (``k_<name>``). ``client``:
        another client of the same database (the broker's, for a fused publish)."""
        key_list, values = self.call_args(name, args, keys=keys, rest=rest)
        return self._evalsha(name, key_list, values, client or self.redis)

    @functools.cached_property
    def history_ms(self) -> int:
        """How long a job's history is kept (``roger_history_ttl``), in ms; 0: not kept."""
        return int(self.settings.history_ttl * 1000)

    def call_args(self, name: str, args: dict[str, Any] | None = None, *,
                  keys: dict[str, str] | None = None,
                  rest: list[Any] | None = None) -> tuple[list[str], list[Any]]:
        """Script ``name``'s KEYS and ARGV, as ``_run`` sends them (see there)."""
        script = SCRIPTS[name]
        given = keys or {}
        try:
            key_list = [given[k] if k in given else getattr(self, "k_" + k) for k in script.keys]
        except AttributeError as exc:
            missing = (exc.name or "").removeprefix("k_")
            raise TypeError(f"{name}.lua needs key {missing!r}") from None
        if rest is None:
            values = args or {}
            if "hist_ms" in script.args and "hist_ms" not in values:
                values = {**values, "hist_ms": self.history_ms}
            if set(values) != set(script.args):
                raise TypeError(f"{name}.lua takes ARGV {script.args}, got {sorted(values)}")
            rest = [values[a] for a in script.args]
        return key_list, rest

    def _evalsha(self, name: str, keys: list[str], args: list[Any], client: Any) -> Any:
        """EVALSHA, loading the script on NOSCRIPT (a restarted Redis, SCRIPT FLUSH): what
        redis-py's ``Script`` does, without its per-call overhead (about 20 µs here, on
        every transition)."""
        script = SCRIPTS[name]
        try:
            return client.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            client.script_load(script.source)
            return client.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)

    def __repr__(self) -> str:
        return f"<Store {redact_url(self.settings.redis_url)} partition={self.partition!r}>"

    def parked_key(self, execution_key: str) -> str:
        return f"{self.prefix}parked:{execution_key}"

    def used_keys(self, **keys: Any) -> dict[str, str]:
        """KEYS for ``_run``: each given key name, or, where it is falsy (the script will
        not touch that key on this call: a job without an execution key, a rate, ...),
        ``unused``, which names no key roger has, so the script's key-type guard passes
        over it without a call to Redis (each TYPE costs every call a few µs)."""
        return {name: key or self.k_unused for name, key in keys.items()}

    def rate_key(self, rate_key: str) -> str:
        """The window of a rate key: its recent starts and reservations (lib.lua)."""
        return f"{self.prefix}rate:{rate_key}"

    def ratewait_key(self, rate_key: str) -> str:
        """The line of jobs waiting for a rate key's window to open."""
        return f"{self.prefix}ratewait:{rate_key}"

    def qkwait_key(self, queue_key: str) -> str:
        """The job waiting for a queue key held by a running job (on_duplicate="replace")."""
        return f"{self.prefix}qkwait:{queue_key}"

    def held_key(self, queue: str) -> str:
        return f"{self.prefix}held:{queue}"

    def history_key(self, job_id: str) -> str:
        """A job's history (lib.lua's ``history``)."""
        return f"{self.prefix}hist:{job_id}"

    def buried_key(self, queue: str) -> str:
        return f"{self.prefix}buried:{queue}"

    def redis_time_ms(self) -> float:
        seconds, micros = self.redis.time()
        return seconds * 1000 + micros / 1000

    # -- poison-proofing -----------------------------------------------------------------

    def decode(self, raw: Any, key: str, field: str, *, kombu: bool = False) -> Any:
        """The JSON object stored at ``key``/``field``, or None: a value that is not one is
        moved aside to the quarantine (see lib.lua) and logged, never raised."""
        try:
            value = kombu_loads(raw) if kombu else json.loads(raw)
        except Exception as exc:
            reason = f"unreadable: {type(exc).__name__}"
        else:
            if isinstance(value, dict):
                return value
            reason = f"not a JSON object but {type(value).__name__}"
        self.quarantine(key, field, raw, reason)
        return None

    def quarantine(self, key: str, field: str, raw: Any, reason: str) -> None:
        """Move the value ``raw`` of hash ``key`` aside, if it is still there; log it."""
        logger.error("roger: quarantined %s[%s] (%s): %s", key, field, reason, preview(raw))
        try:
            self._run(
                "quarantine", dict(field=field, value=raw, reason=reason), keys={"hash": key}
            )
        except redis.RedisError as exc:
            logger.warning("roger: could not move %s[%s] to the quarantine: %s", key, field, exc)

    def quarantined(self) -> dict[str, dict[str, Any]]:
        """What was moved aside, by key (``key#field`` for one value of a hash)."""
        found = {}
        for name, raw in self.redis.hgetall(self.k_quarantine).items():
            try:
                record = json.loads(text(raw))
            except ValueError:
                record = {"preview": preview(raw)}
            found[text(name)] = record if isinstance(record, dict) else {"preview": preview(raw)}
        return found
