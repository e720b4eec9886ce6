"""``celery -A proj roger ...``: roger state from the command line.

Registered through Celery's ``celery.commands`` entry point. Read commands take
``--json``; bad arguments and failures give a one-line error and a non-zero exit.
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import click
from redis.exceptions import RedisError

from .api import Roger
from .cli_actions import cancel_line, confirm, purged_line, refuse_together, yes_option
from .config import redact_url
from .errors import RogerError


def _roger(ctx: click.Context) -> Roger:
    obj = ctx.find_root().obj
    app = getattr(obj, "app", None)
    if app is None:
        raise click.ClickException("no Celery app: run it as `celery -A proj roger ...`")
    return Roger(app)


def _guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Every failure is one line and a non-zero exit, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except (ValueError, TypeError, RogerError) as exc:
            raise click.ClickException(str(exc)) from None
        except RedisError as exc:
            raise click.ClickException(f"{_redis_name()}: {type(exc).__name__}: {exc}") from None
        except Exception as exc:
            raise click.ClickException(f"{type(exc).__name__}: {exc}") from None

    return wrapper


def _redis_name() -> str:
    """Roger's Redis, for an error message: its URL without the password."""
    url = _roger(click.get_current_context()).store.settings.redis_url
    return f"roger's Redis at {redact_url(url)}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and value > 1e9:  # a Unix time
        try:
            return datetime.datetime.fromtimestamp(value).strftime("%H:%M:%S")
        except (OverflowError, OSError, ValueError):
            pass
    return str(value)


def _ago(when: Any) -> str:
    return "-" if not isinstance(when, (int, float)) else f"{time.time() - when:.0f}s ago"


def _when(at: Any) -> str:
    """A time, absolute (UTC, to the ms) and relative."""
    if not isinstance(at, (int, float)):
        return "-"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(at)) + f".{int(at * 1000) % 1000:03d}"
    return f"{stamp} UTC ({_ago(at)})"


def _emit(data: Any, as_json: bool, human: Callable[[], str]) -> None:
    click.echo(json.dumps(data, indent=2, default=str) if as_json else human())


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


@click.group(name="roger")
def roger() -> None:
    """Roger state: queues, keys, jobs, the buried queue; pause, cancel, requeue, purge."""


@roger.command()
@json_option
@click.pass_context
@_guard
def status(ctx: click.Context, as_json: bool) -> None:
    """Queues, running jobs, held keys and pending cancellations."""
    info = _roger(ctx).info()

    def human() -> str:
        out = [f"partition {info['partition']}", ""]
        out.append(table(["queue", "depth", "paused", "running", "parked", "held", "buried"], [
            [q, v["depth"], (f"since {_ago(v['paused_at'])}" + (f" ({v['paused_reason']})"
                                                                 if v["paused_reason"] else ""))
             if v["paused"] else False, v["running"], v["parked"], v["held_for_pause"],
             v["buried"]] for q, v in info["queues"].items()]))
        running = info["running"]
        out += ["", f"running roger jobs: {running['count']}"]
        if running["jobs"]:
            out.append(table(["id", "task", "queue", "worker", "since", "execution key"], [
                [j["id"], j["task"], j["queue"], j["worker"], _ago(j["since"]),
                 j["execution_key"]] for j in running["jobs"]]))
        keys = info["execution_keys"]
        out += ["", f"execution keys with a holder: {keys['count']}"]
        if keys["keys"]:
            out.append(table(["key", "holder", "worker", "alive", "since", "parked"], [
                [k["key"], k["holder"], k["worker"], k["worker_alive"], _ago(k["since"]),
                 k["parked"]] for k in keys["keys"]]))
        out += ["", f"queue keys taken: {info['queue_keys']['count']}",
                f"waiting retries: {info['retrying']}",
                f"buried: {info['buried']['count']}",
                f"pending cancellations: {info['cancellations']['count']}"]
        if info.get("quarantined"):
            out.append(f"quarantined values: {info['quarantined']} "
                       "(celery -A proj roger quarantine)")
        return "\n".join(out)

    _emit(info, as_json, human)


@roger.command()
@click.argument("queue")
@click.option("--reason", default=None, help="Why (shown by status and the dashboard).")
@click.pass_context
@_guard
def pause(ctx: click.Context, queue: str, reason: str | None) -> None:
    """Pause QUEUE for the whole cluster."""
    _roger(ctx).pause(queue, reason=reason)
    click.echo(f"paused {queue}")


@roger.command()
@click.argument("queue")
@click.pass_context
@_guard
def resume(ctx: click.Context, queue: str) -> None:
    """Resume QUEUE."""
    released = _roger(ctx).resume(queue)
    click.echo(f"resumed {queue}" + (f" ({released} held jobs published)" if released else ""))


@roger.command()
@click.argument("job_ids", nargs=-1, required=True)
@click.pass_context
@_guard
def cancel(ctx: click.Context, job_ids: tuple[str, ...]) -> None:
    """Cancel jobs: they never run (again); running ones are stopped.

    Says where each was, or that it had finished, or that roger does not know it (its
    cancellation is stored anyway: a job without keys may still be in the broker)."""
    if not all(job_ids):
        raise click.BadParameter("a job id cannot be empty", param_hint="JOB_IDS")
    r = _roger(ctx)
    for job_id in job_ids:
        click.echo(cancel_line(r, job_id))


@roger.command()
@click.argument("kind", type=click.Choice(["execution", "rate"]))
@click.argument("key")
@click.argument("value", required=False)
@click.option("--clear", is_flag=True, help="Back to the limit its jobs were published with.")
@click.pass_context
@_guard
def limit(ctx: click.Context, kind: str, key: str, value: str | None, clear: bool) -> None:
    """Change KEY's limit live, for the whole cluster (execution: its execution_limit, an
    int; rate: its rate, N/s, N/m or N/h)."""
    if clear == (value is not None):
        raise click.ClickException("give either VALUE or --clear")
    given: int | str | None = value
    if kind == "execution" and value is not None:
        if not value.isdigit() or int(value) < 1:
            raise click.BadParameter(f"{value!r} is not an int >= 1", param_hint="VALUE")
        given = int(value)
    try:
        started = _roger(ctx).set_limit(kind, key, None if clear else given)
    except (TypeError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint="VALUE") from None
    click.echo(f"{kind} limit of {key!r}: " + ("cleared" if clear else str(value))
               + (f"; started {len(started)} parked job(s)" if started else ""))


@roger.command()
@click.option("--kind", type=click.Choice(["queue", "execution"]), default=None,
              help="Which keys (default: both; --release: queue).")
@click.option("--prefix", default=None, help="Only keys starting with this.")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--release", "release", default=None, metavar="KEY",
              help="Force-release KEY (of --kind, default queue).")
@json_option
@click.pass_context
@_guard
def keys(ctx: click.Context, kind: str | None, prefix: str | None, limit: int,
         release: str | None, as_json: bool) -> None:
    """Held keys, or release one."""
    refuse_together(ctx, "release", "prefix", "limit", "as_json")
    r = _roger(ctx)
    if release is not None:
        holder = r.release_key(kind or "queue", release)
        click.echo(f"released {kind or 'queue'} key {release!r}"
                   + (f" (held by {holder})" if holder else " (it was not held)"))
        return
    kinds = [kind] if kind else ["queue", "execution"]
    pages = {k: r.keys(k, prefix=prefix, limit=limit) for k in kinds}

    def human() -> str:
        rows = [[k, item["key"], item["holder"]] for k, page in pages.items()
                for item in page["keys"]]
        return table(["kind", "key", "holder"], rows) if rows else "no keys held"

    _emit(pages, as_json, human)


@roger.command()
@click.argument("job_id")
@json_option
@click.pass_context
@_guard
def job(ctx: click.Context, job_id: str, as_json: bool) -> None:
    """One job: where it is, and why it is not running."""
    view = _roger(ctx).job(job_id)

    def human() -> str:
        rows = [[k, v] for k, v in view.items() if k not in ("explanation", "history")]
        shown = table(["field", "value"], rows) + f"\n\n{view.get('explanation', '')}"
        if view.get("history"):
            shown += "\n\nhistory:\n" + table(["at", "event", "worker", "detail"], [
                [_when(e["at"]), e["event"], e["worker"] or "", e["detail"] or ""]
                for e in view["history"]])
        return shown

    _emit(view, as_json, human)


@roger.command()
@click.argument("queue", required=False)
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--offset", type=click.IntRange(min=0), default=0, show_default=True)
@json_option
@click.pass_context
@_guard
def buried(ctx: click.Context, queue: str | None, limit: int, offset: int,
           as_json: bool) -> None:
    """Buried jobs, newest first."""
    jobs = _roger(ctx).buried(queue, limit=limit, offset=offset)
    data = [vars(j) for j in jobs]

    def human() -> str:
        if not jobs:
            return "no buried jobs"
        return table(["id", "task", "queue", "retries", "buried", "error"], [
            [j.id, j.task, j.queue, j.retry_count, _ago(j.buried_at), j.error[:60]]
            for j in jobs])

    _emit(data, as_json, human)


@roger.command()
@click.argument("job_id", required=False)
@click.option("--queue", default=None, help="With --all: every buried job of QUEUE.")
@click.option("--all", "all_", is_flag=True, help="Requeue every buried job of --queue.")
@click.pass_context
@_guard
def requeue(ctx: click.Context, job_id: str | None, queue: str | None, all_: bool) -> None:
    """Publish buried jobs again (same id, retry count 0)."""
    refuse_together(ctx, "job_id", "all_", "queue")
    if job_id is None and not (queue and all_):
        raise click.UsageError("give a JOB_ID, or --queue QUEUE --all")
    r = _roger(ctx)
    count = (r.requeue_buried(job_id) if job_id is not None
             else r.requeue_buried(queue=queue, all=True))
    click.echo(f"requeued {count}")
    if job_id is not None and count == 0:
        raise click.ClickException(f"{job_id} was not requeued: not buried, or its queue key "
                                   "is held by another job")


@roger.command()
@json_option
@click.pass_context
@_guard
def quarantine(ctx: click.Context, as_json: bool) -> None:
    """What roger moved aside because it could not read it, newest first."""
    records = _roger(ctx).quarantined()

    def human() -> str:
        if not records:
            return "nothing quarantined"
        rows = []
        for name, record in sorted(records.items(), key=lambda kv: _number(kv[1].get("at")),
                                   reverse=True):
            why = record.get("reason") or (
                f"a {record.get('type')} where a {record.get('expected')} belongs; moved to "
                f"{record.get('moved_to')}" if record.get("type") else None)
            at = _number(record.get("at"))
            rows.append([_ago(at / 1000) if at else None, _line(name), _line(why),
                         _line(record.get("preview"))])
        return table(["when", "key", "reason", "value"], rows)

    _emit(records, as_json, human)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) else 0.0


def _line(value: Any, limit: int = 80) -> str | None:
    """``value`` on one line, control characters escaped (it is anything Redis held)."""
    if value is None:
        return None
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(value))
    return text if len(text) <= limit else text[:limit] + "..."


@roger.command(name="purge-buried")
@click.argument("queue", required=False)
@yes_option
@click.pass_context
@_guard
def purge_buried(ctx: click.Context, queue: str | None, yes: bool) -> None:
    """Delete buried jobs (of QUEUE, or of every queue: asks first, unless --yes)."""
    r = _roger(ctx)
    if queue is None:
        confirm("Delete the buried jobs of every queue?", yes)
    click.echo(f"purged {r.purge_buried(queue)}")


@roger.command()
@click.argument("queue")
@yes_option
@json_option
@click.pass_context
@_guard
def purge(ctx: click.Context, queue: str, yes: bool, as_json: bool) -> None:
    """Delete every job waiting for QUEUE (asks first, unless --yes).

    The broker's messages of QUEUE, and the jobs roger keeps for it (parked behind an
    execution key, held while it is paused, waiting retries); their keys are released.
    Running and buried jobs are not touched."""
    r = _roger(ctx)
    if not queue:
        raise click.BadParameter("a queue name cannot be empty", param_hint="QUEUE")
    confirm(f"Delete every job waiting for queue {queue!r} (in the broker, parked, held, "
            "waiting retries)?", yes)
    counts = r.purge(queue)
    _emit(counts, as_json, lambda: purged_line(queue, counts))


@roger.command()
@click.option("--address", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=5566, show_default=True)
@click.option("--token", default=None, help="Token actions require (or roger_dashboard_token).")
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="HOST[:PORT]",
              help="A Host header to answer (repeatable; '*' for any; or "
                   "roger_dashboard_allowed_hosts). Default: the --address, and localhost, "
                   "127.0.0.1 and [::1] when it is a loopback address or 0.0.0.0.")
@click.option("--flower-url", default=None, metavar="URL",
              help="Flower's base URL: each job links to its Flower page.")
@click.pass_context
@_guard
def dashboard(ctx: click.Context, address: str, port: int, token: str | None,
              allowed_hosts: tuple[str, ...], flower_url: str | None) -> None:
    """Serve the web dashboard (read-only without a token)."""
    try:
        from .dashboard import serve
    except ImportError as exc:
        raise click.ClickException(
            f'the dashboard needs its extras: pip install "celery-roger[dashboard]" ({exc})'
        ) from None
    serve(_roger(ctx), address=address, port=port, token=token,
          allowed_hosts=allowed_hosts or None, flower_url=flower_url)
