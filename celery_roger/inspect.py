"""Read-only views of roger state: ``Roger(app).info()``, ``.job(id)``, ``.keys(...)``.

Everything here is a bounded read: hashes that hold one entry per running job or held
execution key (bounded by the cluster's concurrency), per-queue counters, and capped
samples of what can be long (queue keys, cancellations). Nothing scans the keyspace.
"""

from __future__ import annotations

import json
from typing import Any

from celery import Celery

from .job import job_header
from .store import Store, _text, loads

LIST_CAP = 100


def _json(raw: Any) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _lease_info(store: Store, instances: list[str], now_ms: float) -> dict[str, dict[str, Any]]:
    if not instances:
        return {}
    scores = store.redis.zmscore(store.k_workers, instances)
    return {i: {"lease_expires": None if s is None else s / 1000,
                "alive": s is not None and s > now_ms} for i, s in zip(instances, scores,
                                                                       strict=True)}


def broker_depths(app: Celery, queues: list[str]) -> dict[str, int | None]:
    """Messages ready in each queue, as the broker counts them (None if unknown)."""
    depths: dict[str, int | None] = dict.fromkeys(queues)
    try:
        with app.connection_for_read() as conn:
            for queue in queues:
                try:
                    channel = conn.channel()
                    try:
                        depths[queue] = channel.queue_declare(queue=queue, passive=True)[1]
                    finally:
                        channel.close()
                except Exception:
                    depths[queue] = 0  # the broker does not know it: nothing is waiting
    except Exception:
        pass
    return depths


def info(app: Celery, store: Store) -> dict[str, Any]:
    now_ms = store.redis_time_ms()
    pipe = store.redis.pipeline(transaction=False)
    pipe.hgetall(store.k_running)
    pipe.hgetall(store.k_held)
    pipe.hgetall(store.k_paused)
    pipe.hgetall(store.k_parked_count)
    pipe.smembers(store.k_buried_queues)
    pipe.hlen(store.k_qkeys)
    pipe.hscan(store.k_qkeys, 0, count=LIST_CAP)
    pipe.zcard(store.k_cancelled)
    pipe.zrevrangebyscore(store.k_cancelled, "+inf", now_ms, start=0, num=LIST_CAP)
    pipe.zcard(store.k_retry)
    pipe.hlen(store.k_msg)
    pipe.hlen(store.k_buried_msg)
    pipe.hgetall(store.k_buried_dropped)
    (running_raw, held_raw, paused_raw, parked_count, buried_queues, qk_count, qk_scan,
     cancel_count, cancels, retry_count, parked_total, buried_total, dropped) = pipe.execute()

    running = {_text(j): _json(v) for j, v in running_raw.items()}
    held = {_text(k): _text(j) for k, j in held_raw.items()}
    paused = {_text(q): _json(v) for q, v in paused_raw.items()}
    instances = sorted({str(r.get("instance")) for r in running.values() if r.get("instance")})
    leases = _lease_info(store, instances, now_ms)

    pipe = store.redis.pipeline(transaction=False)
    for key in held:
        pipe.llen(store.parked_key(key))
    queues_buried = sorted(_text(q) for q in buried_queues)
    for queue in queues_buried:
        pipe.zcard(store.buried_key(queue))
    counts = pipe.execute()
    parked_per_key = dict(zip(held, counts[:len(held)], strict=True))
    buried_per_queue = dict(zip(queues_buried, counts[len(held):], strict=True))

    running_list = []
    running_per_queue: dict[str, int] = {}
    for job_id, r in sorted(running.items(), key=lambda kv: kv[1].get("admitted_at") or 0):
        queue = str(r.get("queue") or "")
        running_per_queue[queue] = running_per_queue.get(queue, 0) + 1
        running_list.append({
            "id": job_id, "task": r.get("task"), "queue": queue, "worker": r.get("worker"),
            "pid": r.get("pid"), "since": r.get("admitted_at"),
            "queue_key": r.get("qk") or None, "execution_key": r.get("ek") or None,
            "worker_alive": leases.get(str(r.get("instance")), {}).get("alive", False),
        })
    keys_list = []
    for key, holder in sorted(held.items()):
        r = running.get(holder, {})
        lease = leases.get(str(r.get("instance")), {})
        keys_list.append({
            "key": key, "holder": holder, "worker": r.get("worker"),
            "since": r.get("admitted_at"), "lease_expires": lease.get("lease_expires"),
            "worker_alive": lease.get("alive", False), "parked": parked_per_key.get(key, 0),
            "state": "running" if r else "promoted",
        })

    parked_per_queue = {_text(q): int(n) for q, n in parked_count.items() if int(n) > 0}
    names = set(paused) | set(parked_per_queue) | set(buried_per_queue) | set(running_per_queue)
    names |= set(app.amqp.queues.keys())
    names.add(app.conf.task_default_queue)
    names.discard("")
    depths = broker_depths(app, sorted(names))
    queues = {
        q: {
            "depth": depths.get(q), "paused": q in paused,
            "paused_at": paused.get(q, {}).get("at"), "paused_reason": paused.get(q, {})
            .get("reason"), "running": running_per_queue.get(q, 0),
            "parked": parked_per_queue.get(q, 0), "buried": buried_per_queue.get(q, 0),
            "held_for_pause": 0,
        }
        for q in sorted(names)
    }
    if paused:
        pipe = store.redis.pipeline(transaction=False)
        for q in paused:
            pipe.llen(store.paused_jobs_key(q))
        for q, n in zip(paused, pipe.execute(), strict=True):
            queues[q]["held_for_pause"] = int(n)

    return {
        "partition": store.partition,
        "queues": queues,
        "running": {"count": len(running_list), "jobs": running_list[:LIST_CAP]},
        "execution_keys": {"count": len(keys_list), "keys": keys_list[:LIST_CAP]},
        "queue_keys": {"count": int(qk_count),
                       "keys": [{"key": _text(k), "holder": _text(j)}
                                for k, j in sorted(qk_scan[1].items())][:LIST_CAP]},
        "parked": int(parked_total),
        "retrying": int(retry_count),
        "buried": {"count": int(buried_total),
                   "dropped": {_text(q): int(n) for q, n in dropped.items()}},
        "cancellations": {"count": int(cancel_count),  # newest first
                          "ids": [_text(c) for c in cancels]},
        "workers": [{"instance": i, **leases[i]} for i in instances],
    }


def keys(store: Store, kind: str, prefix: str | None, limit: int,
         cursor: int = 0) -> dict[str, Any]:
    """A page of held keys: ``{"keys": [{"key", "holder"}], "cursor": next or 0}``."""
    hash_key = store.k_qkeys if kind == "queue" else store.k_held
    match = None if not prefix else _glob_escape(prefix) + "*"
    next_cursor, page = store.redis.hscan(hash_key, cursor, match=match, count=limit)
    pairs: dict[Any, Any] = dict(page) if isinstance(page, dict) else {}
    items = [{"key": _text(k), "holder": _text(v)} for k, v in sorted(pairs.items())]
    return {"kind": kind, "keys": items[:limit], "cursor": int(next_cursor)}


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def job(app: Celery, store: Store, job_id: str) -> dict[str, Any]:
    """Roger's view of one job, with why it is not running."""
    now_ms = store.redis_time_ms()
    pipe = store.redis.pipeline(transaction=False)
    pipe.hget(store.k_running, job_id)
    pipe.zscore(store.k_retry, job_id)
    pipe.hget(store.k_retry_msg, job_id)
    pipe.hget(store.k_buried_msg, job_id)
    pipe.zscore(store.k_cancelled, job_id)
    pipe.zscore(store.k_cancel_reported, job_id)
    pipe.hget(store.k_msg, job_id)
    pipe.zscore(store.k_promoting, job_id)
    pipe.hget(store.k_paused_msg, job_id)
    (running, retry_at, retry_msg, buried, cancelled, reported, parked_msg, promoting,
     paused_msg) = pipe.execute()
    view: dict[str, Any] = {"id": job_id, "state": "unknown"}
    try:
        celery_state = app.AsyncResult(job_id).state
    except Exception:
        celery_state = None
    view["celery_state"] = celery_state
    if cancelled is not None and cancelled > now_ms:
        view["cancelled"] = {"until": cancelled / 1000, "reported": reported is not None}

    if running:
        r = _json(running)
        alive = _lease_info(store, [str(r.get("instance"))], now_ms).get(
            str(r.get("instance")), {})
        view.update(state="running", task=r.get("task"), queue=r.get("queue"),
                    worker=r.get("worker"), pid=r.get("pid"), since=r.get("admitted_at"),
                    queue_key=r.get("qk") or None, execution_key=r.get("ek") or None,
                    worker_alive=alive.get("alive", False))
        view["explanation"] = (
            f"running on {r.get('worker')} since {_ago(r.get('admitted_at'), now_ms)}"
            + ("" if alive.get("alive") else
               "; that worker's lease has ended: its keys are being freed"))
        return view
    if buried:
        b = loads(buried)
        view.update(state="buried", task=b.get("task"), queue=b.get("queue"),
                    queue_key=b.get("queue_key"), execution_key=b.get("execution_key"),
                    retry_count=b.get("retry_count"), error=b.get("error"),
                    buried_at=b.get("buried_at"))
        view["explanation"] = (f"buried after {b.get('retry_count')} retries: {b.get('error')}"
                               "; requeue it to run it again")
        return view
    if retry_at is not None and retry_msg:
        entry = loads(retry_msg)
        header = job_header((entry.get("options") or {}).get("headers") or
                            (entry.get("raw") or {}).get("headers") or {})
        view.update(state="retrying", task=entry.get("task"), queue=header.get("q"),
                    retry_count=header.get("rc"), next_run=retry_at / 1000,
                    queue_key=header.get("qk"), execution_key=header.get("ek"))
        seconds = max(0.0, (retry_at - now_ms) / 1000)
        view["explanation"] = (f"waiting for retry {header.get('rc')}, due in {seconds:.1f}s"
                               if seconds > 0 else "its retry is due and being published")
        return view
    if paused_msg:
        stored = loads(paused_msg)
        queue = stored.get("queue")
        pause = _json(store.redis.hget(store.k_paused, queue or ""))
        view.update(state="held", queue=queue, paused_at=pause.get("at"),
                    paused_reason=pause.get("reason"))
        view["explanation"] = (f"held because queue {queue!r} is paused"
                               + (f" ({pause.get('reason')})" if pause.get("reason") else "")
                               if pause else f"queue {queue!r} was resumed: being published")
        return view
    if parked_msg:
        message = _json(parked_msg)
        header = job_header(message.get("headers") or {})
        ek = str(header.get("ek") or "")
        view.update(task=(message.get("headers") or {}).get("task"), queue=header.get("q"),
                    queue_key=header.get("qk"), execution_key=ek or None)
        if promoting is not None:
            view.update(state="promoted")
            view["explanation"] = (f"execution key {ek!r} was handed to it; its message is "
                                   "on its way to the broker")
            return view
        holder = store.execution_key_holder(ek) or ""
        holder_info = _json(store.redis.hget(store.k_running, holder)) if holder else {}
        alive = _lease_info(store, [str(holder_info.get("instance"))], now_ms).get(
            str(holder_info.get("instance")), {}) if holder_info else {}
        found: Any = store.redis.lpos(store.parked_key(ek), job_id)
        position = found if isinstance(found, int) else None
        view.update(state="parked", holder=holder or None, holder_worker=holder_info.get(
            "worker"), holder_worker_alive=alive.get("alive", False),
            position=None if position is None else position + 1,
            parked=store.redis.llen(store.parked_key(ek)))
        where = (f" on {holder_info.get('worker')} ("
                 + ("alive" if alive.get("alive") else "lease ended: it will be freed") + ")"
                 if holder_info else "")
        view["explanation"] = (f"parked: execution key {ek!r} is held by job {holder}{where}; "
                               f"position {view['position']} of {view['parked']} in line")
        return view
    if view.get("cancelled"):
        view["state"] = "cancelled"
        view["explanation"] = ("cancelled: it will never run"
                               + ("" if reported else "; dropped when it is delivered"))
        return view
    if celery_state in ("SUCCESS", "FAILURE", "REVOKED"):
        view["state"] = "finished"
        view["explanation"] = f"finished ({celery_state})"
        return view
    paused = store.paused()
    view["explanation"] = ("not in roger state: queued in the broker (waiting for a worker)"
                           " or unknown" + (f"; paused queues: {', '.join(sorted(paused))}"
                                            if paused else ""))
    view["state"] = "queued-or-unknown"
    return view


def _ago(since: Any, now_ms: float) -> str:
    if not isinstance(since, (int, float)):
        return "?"
    return f"{max(0.0, now_ms / 1000 - since):.1f}s"
