"""The dashboard's actions and the console's API (issue 17): who acts (labelled tokens),
the audit log, the lists, the buried queue's filters, bulk actions, releasing a key.

Every action is a POST behind ``Authorization: Bearer <token>``; the token names a label
(``roger_dashboard_tokens``, and ``roger_dashboard_token`` as ``default``), and each action
is written to the audit log with that label once it is done (``audit.py``).
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask, abort, g, jsonify, request

from .. import audit, lists
from ..api import Roger
from ..errors import ConfigurationError

logger = logging.getLogger("celery_roger")

#: The most jobs one bulk action takes.
MAX_BULK = 1000
#: The largest ``offset`` accepted (far beyond any list, below Redis's range).
MAX_OFFSET = 1_000_000_000
#: The label of ``roger_dashboard_token`` (and ``--token``) in the audit log.
DEFAULT_LABEL = "default"

Route = Callable[..., Any]


class Tokens:
    """The tokens actions accept, each with its label."""

    def __init__(self, token: str | None, labelled: Iterable[tuple[str, str]]) -> None:
        pairs = ([(DEFAULT_LABEL, token)] if token else []) + list(labelled)
        labels = [label for label, _ in pairs]
        if len(set(labels)) < len(labels):
            raise ConfigurationError(
                f"roger_dashboard_tokens labels a token {DEFAULT_LABEL!r}, the label of "
                "roger_dashboard_token (or --token): give it another label")
        if len({t for _, t in pairs}) < len(pairs):
            raise ConfigurationError("roger_dashboard_token (or --token) is also one of "
                                     "roger_dashboard_tokens: each label needs its own token")
        self._pairs = [(label, t.encode()) for label, t in pairs]

    def __bool__(self) -> bool:
        return bool(self._pairs)

    def label_of(self, given: str) -> str | None:
        """The label of ``given``, compared in constant time with every token."""
        found = None
        for label, token in self._pairs:
            if hmac.compare_digest(given.encode(), token):
                found = label
        return found


def guard(tokens: Tokens) -> Callable[[Route], Route]:
    """A decorator for the actions: 401 without a token, 403 with a wrong one (or none
    configured: read-only); the label goes to ``g.roger_label`` for the audit log."""

    def action(fn: Route) -> Route:
        def checked(*args: Any, **kwargs: Any) -> Any:
            given = request.headers.get("Authorization", "")
            if not given.startswith("Bearer ") or not given[7:]:
                abort(401, "actions need Authorization: Bearer <token>")
            label = tokens.label_of(given[7:]) if tokens else None
            if label is None:
                abort(403, "wrong token" if tokens else "read-only: no token configured")
            g.roger_label = label
            return fn(*args, **kwargs)

        checked.__name__ = fn.__name__
        return checked

    return action


def audited(roger: Roger, action: str, target: str, **result: Any) -> Any:
    """The action's JSON answer, after writing it to the audit log (a failed write is
    logged and said in the answer: the action itself is done)."""
    try:
        audit.record(roger.store, g.roger_label, action, target, result)
        logged = True
    except Exception:
        logger.exception("roger dashboard: %s by %s on %s is done, but could not be "
                         "written to the audit log", action, g.roger_label, target)
        logged = False
    return jsonify(ok=True, audited=logged, **result)


def _who() -> str:
    """Who acts, as the job's history says it."""
    return f"{g.roger_label} (dashboard)"


def int_arg(name: str, default: int, *, maximum: int, minimum: int = 0) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        shown = raw if len(raw) <= 40 else raw[:40] + "..."
        raise ValueError(f"{name} must be an integer, got {shown!r}") from None
    if not minimum <= value <= maximum:
        raise ValueError(f"{name} must be from {minimum} to {maximum}, got {value}")
    return value


def _float_arg(name: str) -> float | None:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return None
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name} must be Unix seconds, got {raw[:40]!r}") from None


def _body() -> dict[str, Any]:
    """The request's JSON object ({} when it has no body); a body that is not a JSON
    object is a 400, whatever its Content-Type (never read as "no body": an unreadable
    purge must not purge everything)."""
    raw = request.get_data(cache=True)
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    return body


def _ids() -> list[str]:
    ids = _body().get("ids")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) and i for i in ids):
        raise ValueError('the body must be JSON {"ids": [job id, ...]} with at least one id')
    if len(ids) > MAX_BULK:
        raise ValueError(f"at most {MAX_BULK} ids per action, got {len(ids)}")
    return list(dict.fromkeys(ids))


def read_routes(web: Flask, roger: Roger) -> None:
    """The console's reads: lists, buried filters, the audit log."""
    @web.get("/api/roger/lists/<kind>")
    def api_list(kind: str) -> Any:
        given: dict[str, Any] = {name: request.args.get(name) or None
                 for name in ("queue", "task", "error", "worker", "key", "prefix")}
        given.update(since=_float_arg("since"), until=_float_arg("until"))
        return jsonify(roger.browse(kind, limit=int_arg("limit", 50, maximum=lists.MAX_LIMIT,
                                                        minimum=1),
                                    cursor=request.args.get("cursor") or None, **given))

    @web.get("/api/roger/buried/facets")
    def api_buried_facets() -> Any:
        return jsonify(roger.buried_facets())

    @web.get("/api/roger/audit")
    def api_audit() -> Any:
        limit = int_arg("limit", 50, maximum=lists.MAX_LIMIT, minimum=1)
        offset = int_arg("offset", 0, maximum=MAX_OFFSET)
        found = audit.entries(roger.store, limit, offset)
        total = audit.size(roger.store)
        return jsonify(items=found, total=total,
                       cursor=str(offset + len(found)) if offset + len(found) < total else None)


def action_routes(web: Flask, roger: Roger, action: Callable[[Route], Route]) -> None:
    """The actions of SPEC section 8, each written to the audit log."""
    @web.post("/api/roger/queues/<queue>/pause")
    @action
    def api_pause(queue: str) -> Any:
        reason = _body().get("reason") or request.args.get("reason")
        roger.pause(queue, reason=reason)
        return audited(roger, "pause", queue, queue=queue, paused=True, reason=reason)

    @web.post("/api/roger/queues/<queue>/resume")
    @action
    def api_resume(queue: str) -> Any:
        return audited(roger, "resume", queue, queue=queue, paused=False,
                       released=roger.resume(queue))

    @web.post("/api/roger/jobs/<job_id>/cancel")
    @action
    def api_cancel(job_id: str) -> Any:
        return audited(roger, "cancel", job_id, id=job_id,
                       found=roger.cancel(job_id, by=_who()))

    @web.post("/api/roger/buried/<job_id>/requeue")
    @action
    def api_requeue(job_id: str) -> Any:
        return audited(roger, "requeue", job_id, id=job_id,
                       requeued=roger.requeue_buried(job_id))

    @web.post("/api/roger/buried/purge")
    @action
    def api_purge() -> Any:
        if "ids" in _body():
            ids = _ids()
            return audited(roger, "purge", f"{len(ids)} buried jobs", ids=ids,
                           purged=roger.purge_buried_jobs(ids))
        queue = request.args.get("queue") or None
        return audited(roger, "purge", f"buried of {queue}" if queue else "all buried",
                       queue=queue, purged=roger.purge_buried(queue))


def bulk_routes(web: Flask, roger: Roger, action: Callable[[Route], Route]) -> None:
    """Bulk actions on chosen jobs, and releasing a key."""
    @web.post("/api/roger/buried/requeue")
    @action
    def api_bulk_requeue() -> Any:
        ids = _ids()
        done: dict[str, Any] = {}
        for job in ids:  # one that fails (the broker down) does not hide the others
            try:
                done[job] = bool(roger.requeue_buried(job))
            except Exception as exc:
                logger.exception("roger dashboard: could not requeue buried job %s", job)
                done[job] = f"error: {type(exc).__name__}: {exc}"
        return audited(roger, "requeue", f"{len(ids)} buried jobs", ids=ids,
                       requeued=sum(v is True for v in done.values()), results=done)

    @web.post("/api/roger/jobs/cancel")
    @action
    def api_bulk_cancel() -> Any:
        ids = _ids()
        found = roger.cancel_jobs(ids, by=_who())
        return audited(roger, "cancel", f"{len(ids)} jobs", ids=ids, results=found)

    @web.post("/api/roger/keys/<kind>/release")
    @action
    def api_release(kind: str) -> Any:
        key = _body().get("key")
        if not isinstance(key, str) or not key:
            raise ValueError('the body must be JSON {"key": "<the key>"}')
        holder = roger.release_key(kind, key)
        return audited(roger, f"release {kind} key", key, kind=kind, key=key, holder=holder)
