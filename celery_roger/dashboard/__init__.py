"""The web dashboard: ``celery -A proj roger dashboard``.

Flask serves a few self-refreshing pages over ``Roger(app)`` and the JSON API of SPEC
section 8; ``/metrics`` is Prometheus text (prometheus_client). Actions are POST only and
need ``Authorization: Bearer <token>``: none gives 401, a wrong one 403, and with no token
configured the dashboard is read-only (403). It binds to 127.0.0.1 unless told otherwise.

Hardening: the page is a static template (``templates/dashboard.html``) and one same-origin
script (``static/dashboard.js``) that builds the DOM from the JSON API with ``textContent``
and passes values to actions through ``data-*`` attributes, read by one delegated listener;
no value from Redis is ever parsed as HTML or JS. A Content-Security-Policy forbids inline
script. Requests must name an allowed host in their Host header (a DNS rebinding defense):
the bound address (and the loopback names when bound to loopback or to every address), or
``roger_dashboard_allowed_hosts`` / ``--allowed-host``; ``"*"`` allows any.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit

from flask import Flask, Response, abort, jsonify, render_template, request
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from redis.exceptions import RedisError
from werkzeug.exceptions import HTTPException
from werkzeug.serving import make_server

from ..api import Roger
from ..config import dashboard_allowed_hosts, dashboard_token, redact_url
from ..errors import ConfigurationError
from . import console

logger = logging.getLogger("celery_roger")

#: The most buried jobs one ``GET /api/roger/buried`` returns; a larger ``limit`` is a 400.
MAX_LIMIT = 1000

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


class RogerCollector:
    """Prometheus metrics from one ``info()`` snapshot per scrape (keys never as labels)."""

    def __init__(self, roger: Roger) -> None:
        self.roger = roger

    def collect(self) -> Iterator[GaugeMetricFamily]:
        info = self.roger.info()
        stats = self.roger.stats()
        per_queue = {
            "roger_queue_paused": ("1 if the queue is paused", "paused"),
            "roger_queue_depth": ("messages ready in the broker", "depth"),
            "roger_queue_running_jobs": ("roger jobs running", "running"),
            "roger_queue_parked_jobs": ("jobs parked behind an execution key, waiting on a "
                                        "rate or for a queue key (replace)", "parked"),
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
                "age of the oldest execution key's holder",
                max((now - a for a in ages), default=0)),
            "roger_waiting_retries": ("jobs waiting for a retry", info["retrying"]),
            "roger_pending_cancellations": ("cancellations remembered",
                                            info["cancellations"]["count"]),
            "roger_buried_dropped_total": ("buried jobs dropped over roger_buried_max",
                                           sum(info["buried"]["dropped"].values())),
            "roger_dedup_refusals_total": ("publishes refused because their queue key was taken",
                                           stats.get("dedup_refused", 0)),
            "roger_cancels_total": ("jobs cancelled (on_cancel reported)",
                                    stats.get("cancelled", 0)),
            "roger_quarantined_total": ("unreadable values moved aside to the quarantine",
                                        stats.get("quarantined", 0)),
            "roger_orphaned_keys_total": ("queue keys released because their job was lost",
                                          stats.get("orphaned_keys", 0)),
            "roger_live_limited_keys": ("keys whose execution limit or rate was changed live",
                                        sum(len(v) for v in info.get("limits", {}).values())),
            "roger_rate_keys_waiting": ("rate keys with jobs waiting for their window",
                                        info.get("rates", {}).get("count", 0)),
        }
        for name, (doc, value) in singles.items():
            gauge = GaugeMetricFamily(name, doc, labels=["partition"])
            gauge.add_metric([info["partition"]], float(value))
            yield gauge


# -- the Host header check -----------------------------------------------------------------


def split_host(value: str) -> tuple[str, str | None]:
    """``host[:port]`` as (normalised host, port or None); IPv6 addresses in brackets
    (a bare IPv6 address is taken as one, for allow-list entries). ValueError if malformed."""
    text = value.strip().lower()
    port: str | None = None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"unclosed [ in {value!r}")
        host, rest = text[1:end], text[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{value!r} is not host[:port]")
            port = rest[1:]
        host = "[" + _ip(host) + "]"
    elif text.count(":") > 1:
        host = "[" + _ip(text) + "]"
    else:
        host, sep, rest = text.partition(":")
        port = rest if sep else None
        host = _ip(host) if _is_ip(host) else host.rstrip(".")
    if port is not None and not (port.isascii() and port.isdigit()):
        raise ValueError(f"{value!r} has a bad port")
    if not host or host == "[]":
        raise ValueError(f"{value!r} names no host")
    return host, port


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _ip(text: str) -> str:
    return ipaddress.ip_address(text).compressed


def default_allowed_hosts(address: str) -> tuple[str, ...]:
    """The hosts a dashboard bound to ``address`` answers by default: the address itself,
    and the loopback names when it is a loopback address or every address (0.0.0.0, ::)."""
    bare = address.strip().strip("[]").lower()
    try:
        ip = ipaddress.ip_address(bare)
        loopback, anywhere = ip.is_loopback, ip.is_unspecified
        own = f"[{ip.compressed}]" if ip.version == 6 else ip.compressed
    except ValueError:
        loopback, anywhere, own = bare.rstrip(".") == "localhost", bare == "", bare
    if anywhere:
        return LOOPBACK_NAMES
    if loopback:
        return tuple(dict.fromkeys((own, *LOOPBACK_NAMES)))
    return (own,)


class HostCheck:
    """Whether a Host header names an allowed host. Entries are ``host`` (any port),
    ``host:port`` (that port only) or ``"*"`` (any host)."""

    def __init__(self, hosts: Iterable[str]) -> None:
        self.hosts = tuple(hosts)
        self.any = "*" in self.hosts
        self.entries: list[tuple[str, str | None]] = []
        for entry in self.hosts:
            if entry == "*":
                continue
            try:
                self.entries.append(split_host(entry))
            except ValueError as exc:
                raise ConfigurationError(
                    f"setting roger_dashboard_allowed_hosts (or --allowed-host): {exc}"
                ) from None

    def allows(self, header: str | None) -> bool:
        if self.any:
            return True
        if not header:
            return False
        try:
            host, port = split_host(header)
        except ValueError:
            return False
        return any(host == h and (p is None or p == port) for h, p in self.entries)


# -- the app -------------------------------------------------------------------------------


def create_app(roger: Roger, token: str | None, *, address: str = "127.0.0.1",
               allowed_hosts: Sequence[str] | None = None, flower_url: str | None = None) -> Flask:
    """The dashboard's Flask app. ``token`` (a str, or None for read-only) guards the
    actions; ``allowed_hosts`` (default ``roger_dashboard_allowed_hosts``, else the hosts
    of ``address``, see ``default_allowed_hosts``) are the Host headers it answers;
    ``flower_url``, Flower's base URL, links each job to its Flower page."""
    token = dashboard_token(token, "roger_dashboard_token (or --token)")
    given = (roger.store.settings.dashboard_allowed_hosts if allowed_hosts is None else
             dashboard_allowed_hosts(allowed_hosts,
                                     "roger_dashboard_allowed_hosts (or --allowed-host)"))
    hosts = HostCheck(given or default_allowed_hosts(address))

    web = Flask(__name__, static_folder="static", static_url_path="/static",
                template_folder="templates")
    web.config["roger_allowed_hosts"] = hosts.hosts
    web.config["roger_flower_url"] = flower_base_url(flower_url)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RogerCollector(roger))

    _install_guards(web, hosts, roger)
    _read_routes(web, roger, registry)
    action = console.guard(console.Tokens(token, roger.store.settings.dashboard_tokens))
    console.action_routes(web, roger, action)
    console.bulk_routes(web, roger, action)
    console.read_routes(web, roger)
    return web


def _install_guards(web: Flask, hosts: HostCheck, roger: Roger) -> None:
    """The Host allow-list, security headers, and JSON errors (never a traceback)."""
    @web.before_request
    def check_host() -> None:
        header = request.environ.get("HTTP_HOST")
        if not header:
            abort(400, "a Host header is required")
        if not hosts.allows(header):
            shown = header if len(header) <= 100 else header[:100] + "..."
            abort(403, f"Host {shown!r} is not allowed here (a DNS rebinding defense): "
                       "add it with --allowed-host or the roger_dashboard_allowed_hosts "
                       "setting")

    @web.after_request
    def security_headers(response: Response) -> Response:
        response.headers.update(SECURITY_HEADERS)
        return response

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


def _read_routes(web: Flask, roger: Roger, registry: CollectorRegistry) -> None:
    """The JSON API's reads, /metrics, and the page (the same for every path)."""
    @web.get("/api/roger/info")
    def api_info() -> Any:
        return jsonify(roger.info())

    @web.get("/api/roger/jobs/<job_id>")
    def api_job(job_id: str) -> Any:
        return jsonify(roger.job(job_id))

    @web.get("/api/roger/buried")
    def api_buried() -> Any:
        queue = request.args.get("queue") or None
        limit = console.int_arg("limit", 100, maximum=MAX_LIMIT)
        offset = console.int_arg("offset", 0, maximum=console.MAX_OFFSET)
        return jsonify([vars(j) for j in roger.buried(queue, limit=limit, offset=offset)])

    @web.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), mimetype="text/plain; version=0.0.4")

    @web.get("/")
    @web.get("/jobs/<path:job_id>")
    @web.get("/buried")
    @web.get("/lists/<kind>")
    @web.get("/audit")
    def page(kind: str | None = None, job_id: str | None = None) -> Response:
        # The same static page for every path: its script reads the path and the JSON API.
        # The partition is the only value rendered here, by Jinja's autoescape.
        return Response(render_template("dashboard.html", partition=roger.partition,
                                        flower_url=web.config["roger_flower_url"]),
                        mimetype="text/html")


def flower_base_url(value: str | None) -> str:
    """Flower's base URL without a trailing slash ("" for none); a ValueError naming
    --flower-url for anything but an http(s) URL with a host."""
    if not value:
        return ""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or \
            parts.fragment:
        raise ValueError(f"--flower-url must be an http:// or https:// URL of Flower, "
                         f"got {value!r}")
    return value.rstrip("/")


def serve(roger: Roger, *, address: str = "127.0.0.1", port: int = 5566,
          token: str | None = None, allowed_hosts: Sequence[str] | None = None,
          flower_url: str | None = None) -> None:
    """Serve the dashboard until interrupted. ``token`` defaults to
    ``roger_dashboard_token``, ``allowed_hosts`` to ``roger_dashboard_allowed_hosts`` (then
    to the hosts of ``address``)."""
    settings = roger.store.settings
    token = token or settings.dashboard_token
    web = create_app(roger, token, address=address,
                     allowed_hosts=allowed_hosts or settings.dashboard_allowed_hosts,
                     flower_url=flower_url)
    server = make_server(address, port, web, threaded=True)
    allowed = web.config["roger_allowed_hosts"]
    writable = bool(token or settings.dashboard_tokens)
    print(f"roger dashboard on http://{address}:{server.server_port}/ "
          f"(partition {roger.partition}, Redis {redact_url(settings.redis_url)}, "
          f"{'actions need a token' if writable else 'read-only: no token'}, "
          f"Host {'any' if '*' in allowed else ' or '.join(allowed)})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
