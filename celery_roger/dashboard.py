"""The web dashboard: ``celery -A proj roger dashboard``.

Flask serves a few self-refreshing pages over ``Roger(app)`` and the JSON API of SPEC
section 8; ``/metrics`` is Prometheus text (prometheus_client). Actions are POST only and
need ``Authorization: Bearer <token>``: none gives 401, a wrong one 403, and with no token
configured the dashboard is read-only (403). It binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Iterator
from typing import Any

from flask import Flask, Response, abort, jsonify, request
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from redis.exceptions import RedisError
from werkzeug.exceptions import HTTPException
from werkzeug.serving import make_server

from .api import Roger
from .config import redact_url

logger = logging.getLogger("celery_roger")


class RogerCollector:
    """Prometheus metrics from one ``info()`` snapshot per scrape (keys never as labels)."""

    def __init__(self, roger: Roger) -> None:
        self.roger = roger

    def collect(self) -> Iterator[GaugeMetricFamily]:
        info = self.roger.info()
        stats = self.roger.store.stats()
        per_queue = {
            "roger_queue_paused": ("1 if the queue is paused", "paused"),
            "roger_queue_depth": ("messages ready in the broker", "depth"),
            "roger_queue_running_jobs": ("roger jobs running", "running"),
            "roger_queue_parked_jobs": ("jobs parked behind an execution key", "parked"),
            "roger_queue_held_jobs": ("jobs held for a paused queue", "held_for_pause"),
            "roger_queue_buried_jobs": ("buried jobs", "buried"),
        }
        for name, (doc, field) in per_queue.items():
            gauge = GaugeMetricFamily(name, doc, labels=["partition", "queue"])
            for queue, values in info["queues"].items():
                value = values[field]
                if value is not None:
                    gauge.add_metric([info["partition"], queue], float(value))
            yield gauge
        ages = [k["since"] for k in info["execution_keys"]["keys"] if k.get("since")]
        now = self.roger.store.redis_time_ms() / 1000
        singles = {
            "roger_held_execution_keys": ("execution keys held", info["execution_keys"]["count"]),
            "roger_held_queue_keys": ("queue keys held", info["queue_keys"]["count"]),
            "roger_oldest_execution_key_age_seconds": (
                "age of the oldest held execution key", max((now - a for a in ages), default=0)),
            "roger_waiting_retries": ("jobs waiting for a retry", info["retrying"]),
            "roger_pending_cancellations": ("cancellations remembered",
                                            info["cancellations"]["count"]),
            "roger_buried_dropped_total": ("buried jobs dropped over roger_buried_max",
                                           sum(info["buried"]["dropped"].values())),
            "roger_dedup_refusals_total": ("publishes refused for a held queue key",
                                           stats.get("dedup_refused", 0)),
            "roger_cancels_total": ("jobs cancelled (on_cancel reported)",
                                    stats.get("cancelled", 0)),
        }
        for name, (doc, value) in singles.items():
            gauge = GaugeMetricFamily(name, doc, labels=["partition"])
            gauge.add_metric([info["partition"]], float(value))
            yield gauge


def create_app(roger: Roger, token: str | None) -> Flask:
    web = Flask("celery_roger.dashboard")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RogerCollector(roger))

    def action(fn: Callable[..., Any]) -> Callable[..., Any]:
        def checked(*args: Any, **kwargs: Any) -> Any:
            given = request.headers.get("Authorization", "")
            if not given.startswith("Bearer ") or not given[7:]:
                abort(401, "actions need Authorization: Bearer <token>")
            if not token or not hmac.compare_digest(given[7:].encode(), token.encode()):
                abort(403, "wrong token" if token else "read-only: no token configured")
            return fn(*args, **kwargs)

        checked.__name__ = fn.__name__
        return checked

    @web.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Any:
        return jsonify(error=exc.description), exc.code

    @web.errorhandler(ValueError)
    def bad_request(exc: ValueError) -> Any:
        return jsonify(error=str(exc)), 400

    @web.errorhandler(RedisError)
    def redis_error(exc: RedisError) -> Any:
        url = redact_url(roger.store.settings.redis_url)
        return jsonify(error=f"roger's Redis at {url}: {type(exc).__name__}: {exc}"), 503

    @web.get("/api/roger/info")
    def api_info() -> Any:
        return jsonify(roger.info())

    @web.get("/api/roger/jobs/<job_id>")
    def api_job(job_id: str) -> Any:
        return jsonify(roger.job(job_id))

    @web.get("/api/roger/buried")
    def api_buried() -> Any:
        queue = request.args.get("queue") or None
        limit = _int_arg("limit", 100)
        offset = _int_arg("offset", 0)
        return jsonify([vars(j) for j in roger.buried(queue, limit=limit, offset=offset)])

    @web.post("/api/roger/queues/<queue>/pause")
    @action
    def api_pause(queue: str) -> Any:
        body = request.get_json(silent=True) or {}
        roger.pause(queue, reason=body.get("reason") or request.args.get("reason"))
        return jsonify(ok=True, queue=queue, paused=True)

    @web.post("/api/roger/queues/<queue>/resume")
    @action
    def api_resume(queue: str) -> Any:
        return jsonify(ok=True, queue=queue, paused=False, released=roger.resume(queue))

    @web.post("/api/roger/jobs/<job_id>/cancel")
    @action
    def api_cancel(job_id: str) -> Any:
        return jsonify(ok=True, id=job_id, found=roger.cancel(job_id))

    @web.post("/api/roger/buried/<job_id>/requeue")
    @action
    def api_requeue(job_id: str) -> Any:
        return jsonify(ok=True, id=job_id, requeued=roger.requeue_buried(job_id))

    @web.post("/api/roger/buried/purge")
    @action
    def api_purge() -> Any:
        queue = request.args.get("queue") or None
        return jsonify(ok=True, purged=roger.purge_buried(queue))

    @web.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), mimetype="text/plain; version=0.0.4")

    @web.get("/")
    @web.get("/jobs/<job_id>")
    @web.get("/buried")
    def page(job_id: str | None = None) -> Response:
        return Response(PAGE.replace("__PARTITION__", roger.partition), mimetype="text/html")

    return web


def _int_arg(name: str, default: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


def serve(roger: Roger, *, address: str = "127.0.0.1", port: int = 5566,
          token: str | None = None) -> None:
    token = token or roger.store.settings.dashboard_token
    server = make_server(address, port, create_app(roger, token), threaded=True)
    print(f"roger dashboard on http://{address}:{server.server_port}/ "
          f"(partition {roger.partition}, Redis {redact_url(roger.store.settings.redis_url)}, "
          f"{'actions need the token' if token else 'read-only: no token'})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>roger: __PARTITION__</title>
<style>
body{font:14px system-ui,sans-serif;margin:0;color:#222}
header{background:#2b3a42;color:#fff;padding:10px 20px}header a{color:#cde;margin-right:16px}
main{padding:12px 20px}table{border-collapse:collapse;margin:8px 0 20px}
th,td{border-bottom:1px solid #ddd;padding:4px 10px;text-align:left;font-size:13px}
th{background:#f3f5f6}.paused{color:#b00;font-weight:600}.muted{color:#888}
button{font-size:12px;margin:0 2px}code{font-size:12px}#msg{color:#063;min-height:1em}
</style></head><body>
<header><b>roger</b> &middot; partition <code>__PARTITION__</code> &nbsp;
<a href="/">overview</a><a href="/buried">buried</a>
<form style="display:inline" onsubmit="go(event)"><input id="jobid" placeholder="job id">
<button>explain</button></form>
<span style="float:right"><button onclick="setToken()">token</button></span></header>
<main><div id="msg"></div><div id="view">loading...</div></main>
<script>
const esc = s => String(s ?? "-").replace(/[&<>"']/g, c => "&#" + c.charCodeAt(0) + ";");
const ago = t => t ? Math.max(0, Date.now() / 1000 - t).toFixed(0) + "s ago" : "-";
function setToken(){const t = prompt("dashboard token"); if (t !== null)
  sessionStorage.setItem("rogerToken", t);}
function go(e){e.preventDefault(); location.href = "/jobs/" +
  encodeURIComponent(document.getElementById("jobid").value.trim());}
async function act(path, confirmText){
  if (confirmText && !confirm(confirmText)) return;
  const r = await fetch(path, {method: "POST", headers:
    {"Authorization": "Bearer " + (sessionStorage.getItem("rogerToken") || "")}});
  const body = await r.json();
  document.getElementById("msg").textContent = r.ok ? "done: " + JSON.stringify(body)
    : "refused (" + r.status + "): " + body.error;
  refresh();
}
function table(head, rows){ return "<table><tr>" + head.map(h => "<th>" + h + "</th>").join("")
  + "</tr>" + rows.map(r => "<tr>" + r.map(c => "<td>" + c + "</td>").join("") + "</tr>")
  .join("") + "</table>"; }
const link = id => '<a href="/jobs/' + encodeURIComponent(id) + '"><code>' + esc(id)
  + "</code></a>";
async function overview(){
  const i = await (await fetch("/api/roger/info")).json();
  const q = Object.entries(i.queues).map(([n, v]) => [esc(n), esc(v.depth),
    v.paused ? '<span class="paused">paused ' + ago(v.paused_at) + (v.paused_reason ?
      " (" + esc(v.paused_reason) + ")" : "") + "</span>" : "no",
    v.running, v.parked, v.held_for_pause, v.buried,
    v.paused ? '<button onclick="act(\\'/api/roger/queues/' + encodeURIComponent(n) +
      '/resume\\')">resume</button>' : '<button onclick="act(\\'/api/roger/queues/' +
      encodeURIComponent(n) + '/pause\\', \\'Pause ' + esc(n) + '?\\')">pause</button>']);
  const run = i.running.jobs.map(j => [link(j.id), esc(j.task), esc(j.queue), esc(j.worker),
    ago(j.since), esc(j.execution_key), '<button onclick="act(\\'/api/roger/jobs/' +
    encodeURIComponent(j.id) + '/cancel\\', \\'Cancel this job?\\')">cancel</button>']);
  const keys = i.execution_keys.keys.map(k => [esc(k.key), link(k.holder), esc(k.worker),
    k.worker_alive ? "yes" : '<span class="paused">no</span>', ago(k.since), k.parked]);
  document.getElementById("view").innerHTML = "<h3>Queues</h3>" + table(["queue", "depth",
    "paused", "running", "parked", "held", "buried", ""], q) + "<h3>Running (" +
    i.running.count + ")</h3>" + table(["job", "task", "queue", "worker", "since",
    "execution key", ""], run) + "<h3>Execution keys (" + i.execution_keys.count + ")</h3>" +
    table(["key", "holder", "worker", "alive", "since", "parked"], keys) +
    "<h3>Queue keys: " + i.queue_keys.count + " &middot; waiting retries: " + i.retrying +
    " &middot; buried: " + i.buried.count + " &middot; cancellations: " +
    i.cancellations.count + "</h3>" + table(["cancelled job"],
    i.cancellations.ids.map(id => [link(id)]));
}
async function jobPage(id){
  const j = await (await fetch("/api/roger/jobs/" + encodeURIComponent(id))).json();
  document.getElementById("view").innerHTML = "<h3>Job " + esc(id) + "</h3><p><b>" +
    esc(j.explanation) + "</b></p>" + table(["field", "value"], Object.entries(j)
    .filter(([k]) => k !== "explanation").map(([k, v]) => [esc(k), esc(typeof v ===
    "object" ? JSON.stringify(v) : v)])) + '<button onclick="act(\\'/api/roger/jobs/' +
    encodeURIComponent(id) + '/cancel\\', \\'Cancel this job?\\')">cancel</button>' +
    (j.state === "buried" ? '<button onclick="act(\\'/api/roger/buried/' +
    encodeURIComponent(id) + '/requeue\\')">requeue</button>' : "");
}
async function buriedPage(){
  const b = await (await fetch("/api/roger/buried?limit=200")).json();
  document.getElementById("view").innerHTML = "<h3>Buried (newest first)</h3>" +
    '<button onclick="act(\\'/api/roger/buried/purge\\', \\'Purge every buried job?\\')">' +
    "purge all</button>" + table(["job", "task", "queue", "retries", "buried", "error", ""],
    b.map(j => [link(j.id), esc(j.task), esc(j.queue), j.retry_count, ago(j.buried_at),
    esc(j.error), '<button onclick="act(\\'/api/roger/buried/' + encodeURIComponent(j.id) +
    '/requeue\\')">requeue</button>']));
}
function refresh(){
  const p = location.pathname;
  const page = p.startsWith("/jobs/") ? jobPage(decodeURIComponent(p.slice(6)))
    : p === "/buried" ? buriedPage() : overview();
  page.catch(e => { document.getElementById("msg").textContent = "error: " + e; });
}
refresh(); setInterval(refresh, 2000);
</script></body></html>
"""
