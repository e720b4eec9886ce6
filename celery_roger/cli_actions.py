"""What the CLI's actions say and refuse (cli.py): confirmations before destructive
commands, option pairs that contradict each other, what a cancel found, what a purge
removed."""

from __future__ import annotations

import getpass
import sys
from typing import Any

import click
from celery import states
from click.core import ParameterSource

from .api import Roger

yes_option = click.option("--yes", "-y", "yes", is_flag=True,
                          help="Do not ask for confirmation.")


def confirm(question: str, yes: bool) -> None:
    """Ask ``question`` before a destructive action, unless ``--yes``. Without a terminal
    to ask on, refuse: nothing is deleted unless someone said so."""
    if yes:
        return
    if sys.stdin is None or not sys.stdin.isatty():
        raise click.ClickException(f"{question} Not confirmed (no terminal to ask on): "
                                   "nothing was deleted; give --yes to go ahead")
    try:
        confirmed = click.confirm(question, default=False)
    except click.Abort:  # end of input, ^C
        confirmed = False
    if not confirmed:
        raise click.ClickException("not confirmed: nothing was deleted")


def given(ctx: click.Context, name: str) -> bool:
    """Whether parameter ``name`` was given (on the command line or in the environment)."""
    return ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT,
                                                  ParameterSource.DEFAULT_MAP)


def refuse_together(ctx: click.Context, name: str, *others: str) -> None:
    """Refuse ``name`` given with any of ``others``: one would be silently ignored."""
    if not given(ctx, name):
        return
    for other in others:
        if given(ctx, other):
            raise click.ClickException(f"{_shown(ctx, name)} and {_shown(ctx, other)} "
                                       "cannot be used together")


def _shown(ctx: click.Context, name: str) -> str:
    for param in ctx.command.params:
        if param.name == name:
            return param.opts[0] if isinstance(param, click.Option) else \
                param.human_readable_name
    return name


def _user() -> str:
    """Who runs the CLI (for a job's history), or "?" when the system cannot say."""
    try:
        return getpass.getuser()
    except (OSError, KeyError, ImportError):
        return "?"


def cancel_line(r: Roger, job_id: str) -> str:
    """Cancel ``job_id`` and say what roger knew of it. The cancellation is stored in every
    case, before anything else is asked (Celery's result backend among them)."""
    where = r.cancel(job_id, by=f"{_user()} (CLI)")
    if where:
        return f"cancelled {job_id} ({where})"
    view = r.job(job_id)  # asks the result backend, never failing when it is unreachable
    state, celery_state = view.get("state"), view.get("celery_state")
    reported = bool((view.get("cancelled") or {}).get("reported"))
    if state not in ("cancelled", "finished", "queued-or-unknown"):
        return f"cancelled {job_id} ({state})"
    if reported and celery_state in (states.REVOKED, None):
        return f"{job_id} was already cancelled"
    if celery_state in states.READY_STATES:
        return f"{job_id} had already finished ({celery_state}): nothing to cancel"
    if reported:
        return f"{job_id} was already cancelled"
    return (f"{job_id} is unknown to roger: the cancellation is stored anyway (a job "
            "without keys may be waiting in the broker: it is dropped when delivered)")


def purged_line(queue: str, counts: dict[str, Any]) -> str:
    return (f"purged {queue}: {counts['broker']} in the broker, {counts['parked']} parked, "
            f"{counts['held']} held (paused), {counts['retrying']} waiting retries")
