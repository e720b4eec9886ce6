"""Read-only views of roger state: ``Roger(app).info()``, ``.job(id)``, ``.keys(...)``,
``.buried(...)``, each composed from the Redis layer's reads (store_reads.py).

Everything here is a bounded read: hashes that hold one entry per running job or held
execution key (bounded by the cluster's concurrency), per-queue counters, and capped
samples of what can be long (queue keys, cancellations). Nothing scans the keyspace.
Nothing read is trusted: what is not what roger wrote reads as absent (store_reads.py);
inspection never raises on what it finds in Redis.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from . import store_reads as reads
from .job import BuriedJob, header_limit, header_rate, job_header
from .keys import base_key, rate_text, slot_number
from .records import StoredJob
from .store import Store
from .store_lines import parked_place, rate_lines, rate_place, throttles
from .store_reads import LIST_CAP
from .values import as_count, as_dict, as_key_or_none, as_str, as_time, as_time_ms

__all__ = ["LIST_CAP", "broker_depths", "buried", "buried_dropped", "buried_ids",
           "buried_job", "buried_queues", "info", "job", "keys", "quarantined", "stats"]


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
    o = reads.overview(store)
    running_list, running_per_queue = _running_jobs(o)
    keys_list = []
    for key, holder in sorted(o.holders.items()):
        found = o.running.get(holder)
        lease = o.leases.get((found or {}).get("instance") or "", {})
        keys_list.append({
            "key": base_key(key), "slot": slot_number(key), "holder": holder,
            "worker": found["worker"] if found else None,
            "since": found["admitted_at"] if found else None,
            "lease_expires": lease.get("lease_expires"),
            "worker_alive": lease.get("alive", False),
            "parked": o.parked_per_key.get(key, 0),
            "state": "running" if found else "promoted",
        })
    return {
        "partition": store.partition,
        "queues": _queues(app, o, running_per_queue),
        "running": {"count": len(running_list), "jobs": running_list[:LIST_CAP]},
        "execution_keys": {"count": len(keys_list), "keys": keys_list[:LIST_CAP]},
        # live limits (Roger.set_limit), by kind and key
        "limits": {"execution": reads.read(store.k_limits, store.limits, {}),
                   "rate": reads.read(store.k_rate_limits, store.rates, {})},
        "rates": rate_lines(store),
        "throttles": throttles(store),
        "queue_keys": {"count": o.qk_count,
                       "keys": [{"key": k, "holder": j}
                                for k, j in sorted(o.qk_sample.items())][:LIST_CAP]},
        "parked": o.parked_total,
        "retrying": o.retry_count,
        "buried": {"count": o.buried_total, "dropped": o.dropped},
        "cancellations": {"count": o.cancel_count, "ids": o.cancels},  # newest first
        "workers": [{"instance": i, **o.leases[i]} for i in sorted(o.leases)],
        "quarantined": o.quarantined,
    }


def _running_jobs(o: reads.Overview) -> tuple[list[dict[str, Any]], dict[str, int]]:
    jobs = []
    per_queue: dict[str, int] = {}
    for job_id, r in sorted(o.running.items(), key=lambda kv: kv[1]["admitted_at"] or 0):
        queue = r["queue"]
        per_queue[queue] = per_queue.get(queue, 0) + 1
        jobs.append({
            "id": job_id, "task": r["task"], "queue": queue, "worker": r["worker"],
            "pid": r["pid"], "since": r["admitted_at"], "queue_key": r["qk"],
            "execution_key": r["ek"],
            "worker_alive": o.leases.get(r["instance"] or "", {}).get("alive", False),
        })
    return jobs, per_queue


def _queues(app: Celery, o: reads.Overview,
            running_per_queue: dict[str, int]) -> dict[str, dict[str, Any]]:
    names = set(o.paused) | set(o.parked_per_queue) | set(o.buried_per_queue)
    names |= set(running_per_queue) | set(app.amqp.queues.keys())
    names.add(app.conf.task_default_queue)
    names.discard("")
    depths = broker_depths(app, sorted(names))
    return {
        q: {
            "depth": depths.get(q), "paused": q in o.paused,
            "paused_at": o.paused.get(q, {}).get("at"),
            "paused_reason": o.paused.get(q, {}).get("reason"),
            "running": running_per_queue.get(q, 0), "parked": o.parked_per_queue.get(q, 0),
            "buried": o.buried_per_queue.get(q, 0),
            "held_for_pause": o.held_per_queue.get(q, 0),
        }
        for q in sorted(names)
    }


def stats(store: Store) -> dict[str, int]:
    """The partition's counters (``stats``): ``dedup_refused``, ``cancelled``,
    ``quarantined`` ...; a value that is not an integer is quarantined."""
    return reads.stats(store)


def quarantined(store: Store) -> dict[str, dict[str, Any]]:
    """What was moved to the quarantine, by key (``key#field`` for one hash value)."""
    return reads.quarantined(store)


def keys(store: Store, kind: str, prefix: str | None, limit: int,
         cursor: int = 0) -> dict[str, Any]:
    """A page of held keys: ``{"keys": [{"key", "holder"}], "cursor": next or 0}``."""
    next_cursor, pairs = reads.keys_page(store, kind, prefix, limit, cursor)
    return {"kind": kind, "keys": [{"key": k, "holder": h} for k, h in pairs][:limit],
            "cursor": next_cursor}


# -- the buried queue -----------------------------------------------------------------------


def buried_job(job_id: str, entry: dict[str, Any], score: Any = None) -> BuriedJob:
    """A ``buried_msg`` entry as a BuriedJob, whatever its fields hold (a field of the wrong
    type reads as absent; ``score``, the burial time in µs, stands in for ``buried_at``)."""
    args, kwargs = entry.get("args"), entry.get("kwargs")
    buried_at = as_time(entry.get("buried_at"))
    if buried_at is None and isinstance(score, (int, float)):
        buried_at = as_time(score / 1e6)
    return BuriedJob(
        id=job_id, task=as_str(entry.get("task")) or "",
        args=tuple(args) if isinstance(args, (list, tuple)) else (),
        kwargs=dict(kwargs) if isinstance(kwargs, dict) else {},
        queue=as_str(entry.get("queue")) or "",
        queue_key=as_key_or_none(entry.get("queue_key")),
        execution_key=as_key_or_none(entry.get("execution_key")),
        retry_count=as_count(entry.get("retry_count")) or 0,
        error=as_str(entry.get("error")) or "", traceback=as_str(entry.get("traceback")),
        buried_at=buried_at or 0.0, error_type=as_str(entry.get("error_type")) or "",
    )


def buried(store: Store, queue: str | None, offset: int, limit: int) -> list[BuriedJob]:
    """A page of buried jobs, newest first."""
    return [buried_job(job_id, entry, score)
            for job_id, entry, score in reads.buried_page(store, queue, offset, limit)]


def buried_ids(store: Store, queue: str) -> list[str]:
    return reads.buried_ids(store, queue)


def buried_queues(store: Store) -> list[str]:
    return reads.buried_queues(store)


def buried_dropped(store: Store) -> dict[str, int]:
    return reads.buried_dropped(store)


# -- one job ------------------------------------------------------------------------------


def job(app: Celery, store: Store, job_id: str) -> dict[str, Any]:
    """Roger's view of one job, with why it is not running."""
    found = reads.job_records(store, job_id)
    view: dict[str, Any] = {"id": job_id, "state": "unknown"}
    try:
        celery_state = app.AsyncResult(job_id).state
    except Exception:
        celery_state = None
    view["celery_state"] = celery_state
    if found.cancelled:
        view["cancelled"] = {"until": found.cancelled_until,
                             "reported": found.cancel_reported}
    view["history"] = found.history
    for explain in (_running_view, _buried_view, _retry_view, _held_view, _parked_view):
        if explain(store, found, view):
            return view
    if view.get("cancelled"):
        view["state"] = "cancelled"
        view["explanation"] = ("cancelled: it will never run" + (
            "" if found.cancel_reported else "; dropped when it is delivered"))
    elif celery_state in ("SUCCESS", "FAILURE", "REVOKED"):
        view["state"] = "finished"
        view["explanation"] = f"finished ({celery_state})"
    else:
        paused = reads.paused(store)
        view["state"] = "queued-or-unknown"
        view["explanation"] = (
            "not in roger state: queued in the broker (waiting for a worker) or unknown"
            + (f"; paused queues: {', '.join(sorted(paused))}" if paused else ""))
    return view


def _running_view(store: Store, found: reads.JobRecords, view: dict[str, Any]) -> bool:
    if found.running is None:
        return False
    r = reads.running_record(found.running)
    if found.buried is not None and (r["admitted_at"] or 0) <= \
            (buried_job(view["id"], found.buried).buried_at or 0):
        return False  # that attempt was buried; its record goes with its deferred end
    alive = reads.lease_info(store, [r["instance"]], found.now_ms).get(r["instance"], {}) \
        if r["instance"] else {}
    view.update(state="running", task=r["task"], queue=r["queue"], worker=r["worker"],
                pid=r["pid"], since=r["admitted_at"], queue_key=r["qk"],
                execution_key=r["ek"], worker_alive=alive.get("alive", False))
    view["explanation"] = (
        f"running on {r['worker']} since {_ago(r['admitted_at'], found.now_ms)}"
        + ("" if alive.get("alive") else
           "; that worker's lease has ended: its keys are being freed"))
    return True


def _buried_view(store: Store, found: reads.JobRecords, view: dict[str, Any]) -> bool:
    if found.buried is None:
        return False
    b = buried_job(view["id"], found.buried)
    view.update(state="buried", task=b.task, queue=b.queue, queue_key=b.queue_key,
                execution_key=b.execution_key, retry_count=b.retry_count, error=b.error,
                buried_at=b.buried_at or None)
    view["explanation"] = (f"buried after {b.retry_count} retries: {b.error}"
                           "; requeue it to run it again")
    return True


def _retry_view(store: Store, found: reads.JobRecords, view: dict[str, Any]) -> bool:
    entry = found.retry
    if entry is None:
        return False
    header = job_header(StoredJob.of(entry).headers)
    rc = as_count(header.get("rc"))
    next_run = as_time_ms(found.retry_at)
    view.update(state="retrying", task=as_str(entry.get("task")),
                queue=as_str(header.get("q")), retry_count=rc, next_run=next_run,
                queue_key=as_key_or_none(header.get("qk")),
                execution_key=as_key_or_none(header.get("ek")))
    if next_run is None:
        view["explanation"] = f"waiting for retry {rc}; its due time is unreadable"
    elif next_run > found.now_ms / 1000:
        view["explanation"] = (f"waiting for retry {rc}, due in "
                               f"{next_run - found.now_ms / 1000:.1f}s")
    else:
        view["explanation"] = "its retry is due and being published"
    return True


def _held_view(store: Store, found: reads.JobRecords, view: dict[str, Any]) -> bool:
    if found.held is None:
        return False
    queue = as_str(found.held.get("queue"))
    pause = reads.paused(store).get(queue or "")
    view.update(state="held", queue=queue, paused_at=(pause or {}).get("at"),
                paused_reason=(pause or {}).get("reason"))
    view["explanation"] = (f"held because queue {queue!r} is paused"
                           + (f" ({pause['reason']})" if pause["reason"] else "")
                           if pause else f"queue {queue!r} was resumed: being published")
    return True


def _parked_view(store: Store, found: reads.JobRecords, view: dict[str, Any]) -> bool:
    if found.parked is None:
        return False
    headers = as_dict(found.parked.get("headers"))
    header = job_header(headers)
    ek = as_key_or_none(header.get("ek")) or ""
    view.update(task=as_str(headers.get("task")), queue=as_str(header.get("q")),
                queue_key=as_key_or_none(header.get("qk")), execution_key=ek or None)
    rated = header_rate(header)
    if found.promoting:
        view.update(state="promoted")
        what = f"execution key {ek!r} was handed to it" if ek else \
            f"rate {rated[0] if rated else ''!r} let it start"
        view["explanation"] = f"{what}; its message is on its way to the broker"
        return True
    if rated is not None and _rate_view(store, rated, view):
        return True
    qk = as_key_or_none(header.get("qk"))
    if header.get("qd") == "replace" and qk and _queue_key_view(store, qk, view):
        return True
    place = parked_place(store, ek, view["id"], header_limit(header))
    holder = place.holder_record
    alive = reads.lease_info(store, [holder["instance"]], found.now_ms).get(
        holder["instance"], {}) if holder and holder["instance"] else {}
    view.update(state="parked", holder=place.holder or None,
                holder_worker=holder["worker"] if holder else None,
                holder_worker_alive=alive.get("alive", False),
                position=place.position, parked=place.parked)
    where = (f" on {holder['worker']} ("
             + ("alive" if alive.get("alive") else "lease ended: it will be freed") + ")"
             if holder else "")
    if place.limit > 1:
        view.update(limit=place.limit, holders=place.holders)
        view["explanation"] = (
            f"parked: {len(place.holders)} of {place.limit} slots of execution key {ek!r} "
            f"are held, by jobs {', '.join(place.holders)}; position {view['position']} of "
            f"{view['parked']} in line")
        return True
    view["explanation"] = (f"parked: execution key {ek!r} is held by job {place.holder}"
                           f"{where}; position {view['position']} of {view['parked']} in line")
    return True


def _rate_view(store: Store, rated: tuple[str, int, int], view: dict[str, Any]) -> bool:
    """A job waiting on its rate key's line (False: it is not on it)."""
    place = rate_place(store, rated[0], view["id"], rated[1], rated[2])
    if place is None:
        return False
    rate = rate_text(place.starts, place.window_ms)
    view.update(state="parked", rate_key=rated[0], rate=rate, position=place.position,
                parked=place.waiting, next_start_in=round(place.opens_in, 3))
    view["explanation"] = (f"waiting for rate {rated[0]!r} {rate}: next start in "
                           f"{place.opens_in:.1f} s; position {place.position} of "
                           f"{place.waiting} in line")
    return True


def _queue_key_view(store: Store, queue_key: str, view: dict[str, Any]) -> bool:
    """A job waiting for its queue key behind a running holder (on_duplicate="replace";
    False: it is not waiting for it)."""
    if reads.read(store.k_qkeys, lambda: store.redis.lpos(store.qkwait_key(queue_key),
                                                          view["id"]), None) is None:
        return False
    holder = store.queue_key_holder(queue_key)
    view.update(state="parked", holder=holder, position=1, parked=1)
    view["explanation"] = (f"waiting for queue key {queue_key!r}: running job {holder} holds "
                           "it; it starts when that job ends, unless a newer publish replaces "
                           "it (on_duplicate='replace')")
    return True


def _ago(since: Any, now_ms: float) -> str:
    if not isinstance(since, (int, float)):
        return "?"
    return f"{max(0.0, now_ms / 1000 - since):.1f}s"
