"""Security: Redis with a password (ACL user) or TLS, no secret in any output, JSON only.

Each test starts the Redis it needs (a private redis-server with an ACL user, or one that
speaks only TLS with a throwaway CA) and real workers. The dashboard's token rules (401
without a token, 403 with a wrong one or none configured) are tested in
tests/test_inspection.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

from celery_roger import Roger, install
from celery_roger.testing import WorkerProcess, free_port, redis_server_binary

from .conftest import APPS, events, timeline, wait_until

PASSWORD = "s3cret-pw"
WRONG = "wrong-pw-7f3a"


class PrivateRedis:
    """A redis-server with extra arguments, ready once ``url`` answers PING."""

    def __init__(self, args: list[str], url: str) -> None:
        self.dir = tempfile.mkdtemp(prefix="roger-sec-redis-")
        self.url = url
        self.log = Path(self.dir) / "redis.log"
        cmd = [redis_server_binary(), "--bind", "127.0.0.1", "--save", "", "--appendonly",
               "no", "--dir", self.dir, "--daemonize", "no", "--loglevel", "warning", *args]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            try:
                if redis.Redis.from_url(url, socket_timeout=1).ping():
                    return
            except redis.RedisError as exc:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    output = self.log.read_text(errors="replace").strip()
                    self.stop()
                    raise RuntimeError(f"redis-server did not start: {output}") from exc
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def acl_redis() -> Iterator[PrivateRedis]:
    """Redis with the default user off and one ACL user, ``roger``, with a password."""
    port = free_port()
    server = PrivateRedis(["--port", str(port), "--user", "roger", "on", f">{PASSWORD}", "~*",
                           "&*", "+@all", "--user", "default", "off"],
                          f"redis://roger:{PASSWORD}@127.0.0.1:{port}/0")
    yield server
    server.stop()


def env_for(url: str, queue: str, **extra: str) -> dict[str, str]:
    """roger_app's environment with broker, results and roger state all at ``url`` (these
    tests are about that Redis, whatever broker the rest of the suite runs on)."""
    inherited = {k: v for k, v in os.environ.items()
                 if k not in ("ROGER_TEST_BROKER", "ROGER_TEST_STATE_URL")}
    return {**inherited, "ROGER_TEST_REDIS_URL": url, "ROGER_TEST_QUEUE": queue,
            "PYTHONPATH": os.pathsep.join([str(APPS), os.environ.get("PYTHONPATH", "")]),
            **extra}


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """``start_worker(url, queue, ready=True, extra_args=(), **env)``: a real worker of
    roger_app against ``url`` (not waiting for it to be ready with ``ready=False``)."""
    workers: list[WorkerProcess] = []

    def start(url: str, queue: str, *, ready: bool = True, extra_args: tuple[str, ...] = (),
              **extra: str) -> WorkerProcess:
        w = WorkerProcess("roger_app", queues=[queue], cwd=str(APPS), log_dir=str(tmp_path),
                          name=f"sec-{uuid.uuid4().hex[:6]}@%h",
                          env=env_for(url, queue, **extra), extra_args=extra_args)
        workers.append(w)
        if ready:
            return w.start()
        with open(w.log_path, "ab") as log:
            w.process = subprocess.Popen(w.cmd, stdout=log, stderr=subprocess.STDOUT,
                                         env=w.env, cwd=w.cwd, start_new_session=True)
        return w

    yield start
    for w in workers:
        w.stop()


def celery_cmd(url: str, queue: str, *args: str, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "celery", "-A", "roger_app", *args],
                          cwd=APPS, env=env_for(url, queue, **extra), capture_output=True,
                          text=True, timeout=60)


def publisher(url: str, queue: str) -> Celery:
    """A publishing process's app, by task name, against ``url`` (as roger_app's workers)."""
    app = Celery(f"publisher-{uuid.uuid4().hex[:6]}", broker=url, backend=url)
    app.conf.update(roger_redis_url=url, roger_partition="test", task_default_queue=queue,
                    broker_connection_retry_on_startup=True, broker_heartbeat=0)
    return install(app)


@contextlib.contextmanager
def closing(app: Celery) -> Iterator[Celery]:
    try:
        yield app
    finally:
        app.close()


# -- passwords -----------------------------------------------------------------------


def test_the_password_is_never_shown(acl_redis, start_worker):
    """Broker, results and roger state behind an ACL user's password: keyed jobs run, and
    the password appears in no log, CLI output, info(), dashboard response or report."""
    pytest.importorskip("flask")
    from celery_roger.dashboard import create_app

    url, run = acl_redis.url, uuid.uuid4().hex[:10]
    queue = f"q-{run}"
    w = start_worker(url, queue, extra_args=("-l", "DEBUG"))
    with closing(publisher(url, queue)) as app:
        roger = Roger(app)
        send = app.send_task
        first = send("roger_app.fragile", (run, "a", "sleep", 1), queue_key=f"{run}:qk",
                     execution_key=f"{run}:ek")
        second = send("roger_app.fragile", (run, "b"), execution_key=f"{run}:ek")
        buried = send("roger_app.once", (run, "c", "fail"), queue_key=f"{run}:qk2")
        assert first.get(timeout=20) == "a" and second.get(timeout=20) == "b"
        wait_until(lambda: roger.buried(queue), timeout=20, what="a burial")

        shown = {"worker log": w.log(), "info()": json.dumps(roger.info()),
                 "job()": json.dumps(roger.job(buried.id)), "store": repr(roger.store)}
        assert "roger:***@127.0.0.1" in shown["store"]
        for args in (("status",), ("status", "--json"), ("job", buried.id),
                     ("job", buried.id, "--json"), ("keys",), ("buried", queue, "--json"),
                     ("report",), ("inspect", "conf", "-d", w.nodename, "-t", "5")):
            command = ["roger", *args] if args[0] not in ("report", "inspect") else list(args)
            proc = celery_cmd(url, queue, *command)
            assert proc.returncode == 0, (args, proc.stderr)
            shown[" ".join(command)] = proc.stdout + proc.stderr
        assert "roger_redis_url: 'redis://roger:***@127.0.0.1" in shown["report"]
        assert "redis://roger:***@127.0.0.1" in shown[f"inspect conf -d {w.nodename} -t 5"]

        web = create_app(roger, "dashboard-token").test_client()
        for path in ("/api/roger/info", f"/api/roger/jobs/{buried.id}", "/api/roger/buried",
                     "/metrics", "/", f"/jobs/{buried.id}", "/buried"):
            response = web.get(path)
            assert response.status_code == 200, path
            shown[path] = response.get_data(as_text=True)
        refused = web.post(f"/api/roger/queues/{queue}/pause",
                           headers={"Authorization": "Bearer wrong"})
        assert refused.status_code == 403
        shown["refused action"] = refused.get_data(as_text=True)

    # The dashboard server's own start-up line names the Redis it reads, redacted.
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "celery", "-A", "roger_app", "roger",
                               "dashboard", "--port", str(port)], cwd=APPS,
                              env=env_for(url, queue), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        assert server.stdout is not None
        banner = server.stdout.readline()
        assert f"Redis redis://roger:***@127.0.0.1:{url.rsplit(':', 1)[1]}" in banner, banner
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/roger/info",
                                    timeout=10) as response:
            shown["dashboard server"] = banner + response.read().decode()
    finally:
        server.terminate()
        server.wait(10)

    w.stop()
    shown["worker log"] = w.log()
    for where, text in shown.items():
        assert PASSWORD not in text, f"the password appears in {where}"


def test_a_wrong_password_is_a_clear_error_naming_the_url_redacted(acl_redis, start_worker):
    pytest.importorskip("flask")
    from celery_roger.dashboard import create_app

    bad = acl_redis.url.replace(PASSWORD, WRONG)
    redacted = bad.replace(WRONG, "***")
    run = uuid.uuid4().hex[:10]
    queue = f"q-{run}"
    # The CLI: one line, non-zero exit, the URL without its password.
    proc = celery_cmd(bad, queue, "roger", "status")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"Error: roger's Redis at {redacted}: AuthenticationError: "), line
    # The API raises redis-py's own error; the dashboard answers 503, naming the URL.
    with closing(publisher(bad, queue)) as app:
        with pytest.raises(redis.AuthenticationError) as error:
            Roger(app).info()
        assert WRONG not in str(error.value)
        response = create_app(Roger(app), None).test_client().get("/api/roger/info")
        assert response.status_code == 503
        assert response.get_json()["error"].startswith(f"roger's Redis at {redacted}: ")
    # A worker whose roger_redis_url has a wrong password stops at start, saying so.
    w = start_worker(acl_redis.url, queue, ready=False, ROGER_TEST_STATE_URL=bad)
    assert w.process is not None
    w.process.wait(30)
    assert w.process.returncode != 0
    assert (f"setting roger_redis_url: Redis at {redacted} refused the credentials: invalid "
            "username-password pair") in w.log()
    # A worker whose broker URL has a wrong password: Celery retries, masking it too.
    broker = start_worker(bad, queue, ready=False)
    wait_until(lambda: "Cannot connect to redis://roger:**@127.0.0.1" in broker.log(),
               timeout=20, what="the broker connection error")
    broker.stop()
    for text in (w.log(), broker.log(), response.get_data(as_text=True)):
        assert WRONG not in text and PASSWORD not in text


# -- TLS -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_redis() -> Iterator[PrivateRedis]:
    """Redis that speaks only TLS, with a server certificate from a throwaway CA."""
    if shutil.which("openssl") is None:
        pytest.skip("TLS test needs the openssl command")
    certs = Path(tempfile.mkdtemp(prefix="roger-tls-"))

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=certs, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
            "ca.crt", "-days", "1", "-subj", "/CN=roger test CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out",
            "server.csr", "-subj", "/CN=127.0.0.1")
    (certs / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.crt", "-days", "1", "-extfile", "san.cnf")
    port = free_port()
    url = (f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=required"
           f"&ssl_ca_certs={certs / 'ca.crt'}")
    try:
        server = PrivateRedis(["--port", "0", "--tls-port", str(port), "--tls-cert-file",
                               str(certs / "server.crt"), "--tls-key-file",
                               str(certs / "server.key"), "--tls-ca-cert-file",
                               str(certs / "ca.crt"), "--tls-auth-clients", "no"], url)
    except RuntimeError as exc:
        shutil.rmtree(certs, ignore_errors=True)
        pytest.skip(f"this redis-server cannot serve TLS ({exc})")
    yield server
    server.stop()
    shutil.rmtree(certs, ignore_errors=True)


def test_tls_with_a_verified_certificate(tls_redis, start_worker):
    """Broker, results and roger state over rediss:// with the server certificate checked
    against the CA (``ssl_cert_reqs=required&ssl_ca_certs=...`` in the URL)."""
    server = tls_redis
    run = uuid.uuid4().hex[:10]
    queue = f"q-{run}"
    start_worker(server.url, queue)
    with closing(publisher(server.url, queue)) as app:
        roger = Roger(app)
        key = f"{run}:ek"
        first = app.send_task("roger_app.fragile", (run, "a", "sleep", 1),
                              queue_key=f"{run}:qk", execution_key=key)
        second = app.send_task("roger_app.fragile", (run, "b"), execution_key=key)
        wait_until(lambda: roger.store.parked_ids(key) == [second.id]
                   or second.state == "SUCCESS", timeout=10, what="the second job")
        info = roger.info()
        assert info["partition"] == "test" and queue in info["queues"]
        assert first.get(timeout=20) == "a" and second.get(timeout=20) == "b"
        with redis.Redis.from_url(server.url) as r:
            order = [(e["event"], e.get("name")) for e in timeline(r, run)]
        # One at a time: b started after a was done.
        assert order.index(("done", "a")) < order.index(("attempt", "b")), order
        assert roger.job(first.id)["state"] == "finished"
    # Without the CA the certificate is not trusted: no connection, a clear error.
    unverified = server.url.split("&ssl_ca_certs=")[0]
    with closing(publisher(unverified, queue)) as app, \
            pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        Roger(app).info()


# -- JSON only --------------------------------------------------------------------------


JSON_ONLY = {"accept_content": ["json"], "task_serializer": "json",
             "result_serializer": "json", "result_accept_content": ["json"],
             "event_serializer": "json"}


def test_json_only(app_module, run, r, worker):
    """Workers that accept only JSON run every roger path: parking and promotion, retries,
    burial and requeue, pause and resume. Roger never needs pickle."""
    app = app_module.app
    saved = {k: app.conf[k] for k in JSON_ONLY}
    app.conf.update(JSON_ONLY)  # the publisher's settings, too
    try:
        json_only(app_module, run, r, worker(env={"ROGER_TEST_SETTINGS": json.dumps(JSON_ONLY)}))
    finally:
        app.conf.update(saved)


def json_only(app_module, run, r, w):
    app = app_module.app
    roger = Roger(app)
    queue = f"q-{run}"
    key = f"{run}:e"  # the keyed task's execution key
    holder = app_module.keyed.delay(run, "holder", "sleep", 2)
    parked = app_module.keyed.delay(run, "parked")
    wait_until(lambda: roger.store.parked_ids(key) == [parked.id], timeout=10,
               what="the second job to park")
    stored = dict(roger.store.parked_messages())[parked.id]
    assert stored["content_type"] == "application/json"
    retried = app_module.retrying.delay(run, "retried", "fail1")
    asked = app_module.retrying.delay(run, "asked", "ask0.2")
    buried = app_module.once.delay(run, "buried", "fail")
    assert holder.get(timeout=20) == "holder" and parked.get(timeout=20) == "parked"
    assert retried.get(timeout=20) == "retried" and asked.get(timeout=20) == "asked"
    wait_until(lambda: [b.id for b in roger.buried(queue)] == [buried.id], timeout=20,
               what="the burial")
    assert roger.requeue_buried(buried.id) == 1
    wait_until(lambda: len([e for e in events(r, run, "attempt") if e["name"] == "buried"])
               == 4 and roger.buried(queue), timeout=20, what="the requeued job's burial")
    roger.pause(queue)
    held = app_module.fragile.apply_async((run, "held"), queue_key=f"{run}:held")
    wait_until(lambda: roger.job(held.id)["state"] in ("held", "queued-or-unknown"),
               timeout=10, what="the job in the paused queue")
    roger.resume(queue)
    assert held.get(timeout=20) == "held"
    log = w.log()
    assert "ContentDisallowed" not in log and "Refusing to deserialize" not in log
