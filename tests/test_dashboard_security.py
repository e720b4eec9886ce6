"""The dashboard's hardening (issue 12, point 6), against a real Redis: the Host header
check (a DNS rebinding defense) in the Flask app and in the real ``celery roger dashboard``
server, the cap on ``limit``, the security headers and the page without inline script, an
escaped partition name, and settings of the wrong type refused at start-up, naming them.
The page in a real browser, with crafted ids, queues and partition: test_dashboard_browser."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("flask")

from celery import Celery

from celery_roger import Roger
from celery_roger.config import Settings
from celery_roger.dashboard import create_app
from celery_roger.errors import ConfigurationError
from celery_roger.testing import free_port

from .conftest import APPS
from .test_inspection import cli_env, dashboard  # noqa: F401 (fixture)

EVIL = "evil.example"


@pytest.fixture
def make_app(redis_url: str) -> Iterator[Any]:
    """``make_app(**settings)``: a Celery app on the tests' Redis with these roger settings."""
    apps: list[Celery] = []

    def make(**settings: Any) -> Celery:
        app = Celery(f"dash-{uuid.uuid4().hex[:6]}", broker=redis_url, backend=redis_url)
        app.conf.update({"roger_redis_url": redis_url, "roger_partition": "test",
                         "broker_connection_retry_on_startup": True, **settings})
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()


def get(client: Any, path: str, host: str, **kwargs: Any) -> Any:
    return client.get(path, headers={"Host": host}, **kwargs)


# -- the Host header ---------------------------------------------------------------------


def test_only_allowed_hosts_are_answered(app_module, run):
    roger = Roger(app_module.app)
    web = create_app(roger, "s3cret").test_client()  # bound to 127.0.0.1 (the default)
    for host in ("localhost", "localhost:5566", "127.0.0.1", "127.0.0.1:5566", "[::1]:5566",
                 "LOCALHOST:1234", "[0:0:0:0:0:0:0:1]"):
        for path in ("/", "/api/roger/info", "/metrics", "/static/dashboard.js"):
            assert get(web, path, host).status_code == 200, (host, path)
    for host in (EVIL, f"{EVIL}:5566", "localhost.evil.example", "127.0.0.1.nip.io",
                 "127.0.0.2", "[::2]", "localhost:x", "[::1", "", "a b"):
        for path in ("/", "/api/roger/info", "/metrics", "/static/dashboard.js",
                     "/api/roger/buried", f"/jobs/{run}"):
            response = get(web, path, host)
            assert response.status_code in (400, 403), (host, path)
    refused = get(web, "/api/roger/info", EVIL)
    assert refused.status_code == 403
    error = refused.get_json()["error"]
    assert f"Host '{EVIL}' is not allowed" in error and "--allowed-host" in error, error
    assert "roger_dashboard_allowed_hosts" in error
    assert "queues" not in refused.get_data(as_text=True)

    # An action with the right token but a rebound Host changes nothing.
    queue = f"q-{run}"
    response = web.post(f"/api/roger/queues/{queue}/pause",
                        headers={"Host": EVIL, "Authorization": "Bearer s3cret"})
    assert response.status_code == 403 and queue not in roger.paused_queues()
    response = web.post(f"/api/roger/queues/{queue}/pause",
                        headers={"Host": "localhost", "Authorization": "Bearer s3cret"})
    assert response.status_code == 200 and queue in roger.paused_queues()
    roger.resume(queue)


def test_the_allowed_hosts_follow_the_address_and_the_options(app_module, make_app):
    roger = Roger(app_module.app)

    def answers(web: Any, host: str) -> bool:
        status = get(web, "/api/roger/info", host).status_code
        assert status in (200, 403), (host, status)
        return status == 200

    # Bound to another address: that address only.
    web = create_app(roger, None, address="10.1.2.3").test_client()
    assert answers(web, "10.1.2.3:5566") and answers(web, "10.1.2.3")
    assert not answers(web, "localhost") and not answers(web, EVIL)
    web = create_app(roger, None, address="dash.internal").test_client()
    assert answers(web, "dash.internal:5566") and answers(web, "DASH.internal.")
    assert not answers(web, "127.0.0.1") and not answers(web, EVIL)
    # Bound to every address: the loopback names, until told more.
    web = create_app(roger, None, address="0.0.0.0").test_client()
    assert answers(web, "localhost:5566") and answers(web, "127.0.0.1")
    assert not answers(web, "10.1.2.3") and not answers(web, "0.0.0.0") and not answers(web, EVIL)
    web = create_app(roger, None, address="::1").test_client()
    assert answers(web, "[::1]:5566") and answers(web, "localhost")
    # An explicit list replaces the defaults; host:port entries match that port only.
    web = create_app(roger, None, allowed_hosts=["dash.example", "Other.example:8080"]
                     ).test_client()
    assert answers(web, "dash.example") and answers(web, "dash.example:443")
    assert answers(web, "other.example:8080")
    assert not answers(web, "other.example:8081") and not answers(web, "other.example")
    assert not answers(web, "localhost") and not answers(web, EVIL)
    web = create_app(roger, None, allowed_hosts=["*"]).test_client()
    assert answers(web, EVIL) and answers(web, "localhost")
    # The setting, read like the others.
    app = make_app(roger_dashboard_allowed_hosts=["dash.example", "localhost"])
    web = create_app(Roger(app), None).test_client()
    assert answers(web, "dash.example:80") and answers(web, "localhost")
    assert not answers(web, "127.0.0.1") and not answers(web, EVIL)


def test_the_real_server_checks_the_host_header(run, dashboard):  # noqa: F811
    def call(base: str, host: str) -> tuple[int, str]:
        req = urllib.request.Request(base + "/api/roger/info")
        req.add_header("Host", host)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    base = dashboard()
    port = base.rsplit(":", 1)[1]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost"):
        status, body = call(base, host)
        assert status == 200 and json.loads(body)["partition"] == "test", host
    status, body = call(base, f"{EVIL}:{port}")
    assert status == 403 and "is not allowed" in json.loads(body)["error"], body
    assert "queues" not in body

    base = dashboard("--allowed-host", "dash.example", "--allowed-host", "127.0.0.1")
    port = base.rsplit(":", 1)[1]
    assert call(base, f"dash.example:{port}")[0] == 200
    assert call(base, f"127.0.0.1:{port}")[0] == 200
    assert call(base, f"localhost:{port}")[0] == 403  # not in the list given
    assert call(base, EVIL)[0] == 403

    base = dashboard("--allowed-host", "*")
    assert call(base, EVIL)[0] == 200


# -- limit, headers, the page --------------------------------------------------------------


def test_limit_is_capped(app_module):
    web = create_app(Roger(app_module.app), None).test_client()
    assert web.get("/api/roger/buried?limit=1000").status_code == 200
    assert web.get("/api/roger/buried?limit=0").status_code == 200
    for query in ("limit=1001", f"limit={10**30}", f"limit={'9' * 5000}"):
        response = web.get(f"/api/roger/buried?{query}")
        assert response.status_code == 400, query
        assert "limit" in response.get_json()["error"]
        assert len(response.get_json()["error"]) < 200
    response = web.get(f"/api/roger/buried?offset={10**30}")
    assert response.status_code == 400 and "offset" in response.get_json()["error"]
    assert web.get("/api/roger/buried?limit=-1").status_code == 400


def test_security_headers_and_no_inline_script(app_module):
    web = create_app(Roger(app_module.app), "s3cret").test_client()
    for path in ("/", "/buried", "/jobs/x", "/api/roger/info", "/metrics",
                 "/static/dashboard.js", "/no/such/page"):
        response = web.get(path)
        csp = response.headers.get("Content-Security-Policy", "")
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp, (path, csp)
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
        assert response.headers.get("X-Content-Type-Options") == "nosniff", path
        assert response.headers.get("X-Frame-Options") == "DENY", path
    page = web.get("/").get_data(as_text=True)
    scripts = re.findall(r"<script\b[^>]*>(.*?)</script>", page, re.S | re.I)
    assert scripts == [""], "every script is a same-origin file, none inline"
    assert re.search(r'<script src="/static/dashboard\.js"', page)
    assert not re.search(r"\son[a-z]+\s*=", page, re.I), "no inline event handlers"
    assert "style=" not in page  # the CSP allows no inline style either
    script = web.get("/static/dashboard.js")
    assert script.mimetype in ("text/javascript", "application/javascript")
    js = script.get_data(as_text=True)
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                 "onclick", "setAttribute(\"on", "new Function"):
        assert sink not in js, sink


@pytest.mark.parametrize("job_id", ["x')-alert(1)-('", '"><img src=x onerror=alert(1)>',
                                    "</script><script>alert(1)</script>"])
def test_the_job_page_does_not_reflect_the_id(app_module, job_id):
    web = create_app(Roger(app_module.app), None).test_client()
    response = web.get("/jobs/" + urllib.request.quote(job_id, safe=""))
    assert response.status_code == 200
    body = response.get_data(as_text=True)
    assert job_id not in body and "alert" not in body


def test_the_partition_name_is_escaped(make_app):
    partition = "p</title><script>alert(1)</script><img src=x onerror=alert(2)>'\"&"
    app = make_app(roger_partition=partition)
    web = create_app(Roger(app), None).test_client()
    page = web.get("/").get_data(as_text=True)
    assert "<script>alert" not in page and "<img" not in page and "</title><" not in page
    escaped = ("p&lt;/title&gt;&lt;script&gt;alert(1)&lt;/script&gt;&lt;img src=x "
               "onerror=alert(2)&gt;&#39;&#34;&amp;")
    assert f"<title>roger: {escaped}</title>" in page
    assert f'<code id="partition">{escaped}</code>' in page
    assert web.get("/api/roger/info").get_json()["partition"] == partition


# -- settings of the wrong type --------------------------------------------------------------


def test_a_token_that_is_not_a_string_is_refused(app_module, make_app):
    with pytest.raises(ConfigurationError, match="roger_dashboard_token") as caught:
        Settings.from_app(make_app(roger_dashboard_token=987654321))
    assert "987654321" not in str(caught.value)  # a secret, even when of the wrong type
    with pytest.raises(ConfigurationError, match="roger_dashboard_token"):
        Roger(make_app(roger_dashboard_token=["s3cret"]))
    with pytest.raises(ConfigurationError, match="roger_dashboard_token"):
        create_app(Roger(app_module.app), 987654321)  # type: ignore[arg-type]
    assert Settings.from_app(make_app(roger_dashboard_token="s3cret")).dashboard_token == \
        "s3cret"
    assert Settings.from_app(make_app()).dashboard_token is None


@pytest.mark.parametrize("value", ["dash.example", [1], ["ok", None], [""], {"a": 1}])
def test_allowed_hosts_of_the_wrong_type_are_refused(make_app, value):
    with pytest.raises(ConfigurationError, match="roger_dashboard_allowed_hosts"):
        Settings.from_app(make_app(roger_dashboard_allowed_hosts=value))


def test_malformed_allowed_hosts_are_refused(app_module):
    roger = Roger(app_module.app)
    for value in (["host:port"], ["[::1"], ["a:1:b"]):
        with pytest.raises(ConfigurationError, match="roger_dashboard_allowed_hosts"):
            create_app(roger, None, allowed_hosts=value)
    with pytest.raises(ConfigurationError, match="roger_dashboard_allowed_hosts"):
        create_app(roger, None, allowed_hosts="dash.example")


@pytest.mark.parametrize("settings,option,message", [
    ({"roger_dashboard_token": 12345}, (), "setting roger_dashboard_token must be a string"),
    ({"roger_dashboard_allowed_hosts": "dash.example"}, (),
     "setting roger_dashboard_allowed_hosts must be a list of host names"),
    ({}, ("--allowed-host", "dash.example:http"), "roger_dashboard_allowed_hosts"),
])
def test_the_dashboard_command_refuses_bad_settings_at_start(redis_url, run, settings, option,
                                                             message):
    """One ``Error:`` line naming the setting and a non-zero exit, instead of a server
    that answers 500 on every action."""
    env = {**cli_env(redis_url, run), "ROGER_TEST_SETTINGS": json.dumps(settings)}
    try:
        proc = subprocess.run([sys.executable, "-m", "celery", "-A", "roger_app", "roger",
                               "dashboard", "--port", str(free_port()), *option], cwd=APPS, env=env,
                              capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the dashboard started instead of refusing: {exc.stdout!r}")
    assert proc.returncode != 0
    assert message in proc.stderr and proc.stderr.startswith("Error: "), proc.stderr
    assert "Traceback" not in proc.stderr and "12345" not in proc.stderr
    assert "roger dashboard on" not in proc.stdout
