"""Shared fixtures: a private Redis, the test app, real workers, and the run's timeline."""

from __future__ import annotations

import gc
import importlib
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from celery_roger.testing import RedisServer, WorkerProcess

APPS = Path(__file__).parent / "apps"

#: ROGER_TEST_BROKER runs the tests with another Celery broker (RabbitMQ); results and roger
#: state stay in the private Redis. Unset: the private Redis is the broker too.
TEST_BROKER = os.environ.get("ROGER_TEST_BROKER") or ""


def on_redis_broker() -> bool:
    return not TEST_BROKER or TEST_BROKER.startswith(("redis://", "rediss://"))


#: broker_transport_options of the tests' publishers: on RabbitMQ a publish returns once the
#: broker has the message, so a queue depth read right after it counts it.
CONFIRMED_PUBLISH: dict[str, Any] = {} if on_redis_broker() else {"confirm_publish": True}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``redis_broker(reason)`` are about the Redis transport: skipped on others."""
    if on_redis_broker():
        return
    for item in items:
        marker = item.get_closest_marker("redis_broker")
        if marker is not None:
            why = marker.args[0] if marker.args else "about the Redis transport"
            item.add_marker(pytest.mark.skip(reason=f"Redis broker only: {why}"))


@pytest.fixture(scope="session")
def redis_url(roger_redis: RedisServer) -> str:
    return roger_redis.url


@pytest.fixture(scope="session")
def broker_url(redis_url: str) -> str:
    """The Celery broker of the test app, its workers and its publishers."""
    return TEST_BROKER or redis_url


@pytest.fixture(scope="session")
def r(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture(scope="session")
def app_module(redis_url: str) -> Iterator[Any]:
    """tests/apps/roger_app, imported against the private Redis."""
    os.environ["ROGER_TEST_REDIS_URL"] = redis_url
    sys.path.insert(0, str(APPS))
    module = importlib.import_module("roger_app")
    yield module
    # Let pending AsyncResults unsubscribe while the session's Redis still runs.
    gc.collect()
    module.app.close()


@pytest.fixture
def run(app_module: Any) -> Iterator[str]:
    """A unique id for this test: its keys, its timeline and its own queue."""
    run_id = uuid.uuid4().hex[:10]
    app_module.app.conf.task_default_queue = f"q-{run_id}"
    yield run_id
    app_module.app.conf.task_default_queue = "roger-test"
    delete_queues(app_module.app, [f"q-{run_id}"])


@pytest.fixture
def worker(roger_worker_factory: Callable[..., WorkerProcess], redis_url: str,
           run: str, app_module: Any) -> Iterator[Callable[..., WorkerProcess]]:
    """``worker(pool=..., concurrency=..., env=...)`` starts a real worker on this run's queue."""
    started: list[WorkerProcess] = []
    queues: set[str] = set()

    def start(**options: Any) -> WorkerProcess:
        env = {"ROGER_TEST_REDIS_URL": redis_url, "ROGER_TEST_QUEUE": f"q-{run}",
               "PYTHONPATH": os.pathsep.join([str(APPS), os.environ.get("PYTHONPATH", "")]),
               **options.pop("env", {})}
        options.setdefault("queues", [f"q-{run}"])
        queues.update(options["queues"])
        started.append(w := roger_worker_factory("roger_app", cwd=str(APPS), env=env,
                                                 **options))
        return w

    yield start
    # Stopped before their queues go (a consumer would declare them again); all at once.
    for w in started:
        w.kill(signal.SIGTERM)
    for w in started:
        w.stop()
    delete_queues(app_module.app, sorted(queues))


def broker_depth(app: Any, queue: str) -> int:
    """Messages ready in ``queue`` as the broker counts them (not those delivered and
    unacked); 0 for a queue the broker does not know."""
    with app.connection_for_read() as conn:
        try:
            return int(conn.default_channel.queue_declare(queue=queue, passive=True)[1])
        except conn.channel_errors:  # RabbitMQ: no such queue (Redis: an empty one)
            return 0


def delete_queues(app: Any, queues: list[str]) -> None:
    """On RabbitMQ, a test's queues (and their exchanges) go with the test; a private
    Redis goes with the session."""
    if on_redis_broker():
        return
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        for queue in queues:
            channel.queue_delete(queue)
            channel.exchange_delete(queue)


def timeline(r: redis.Redis, run: str) -> list[dict[str, Any]]:
    return [json.loads(e) for e in r.lrange(f"timeline:{run}", 0, -1)]


def wait_until(predicate: Callable[[], Any], *, timeout: float, what: str,
               interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def events(r: redis.Redis, run: str, event: str) -> list[dict[str, Any]]:
    return [e for e in timeline(r, run) if e["event"] == event]


def assert_serial(entries: list[dict[str, Any]]) -> list[str]:
    """Starts and stops strictly alternate (never two running); returns the start order."""
    running = None
    order = []
    for e in entries:
        if e["event"] == "start":
            assert running is None, f"{e['name']} started while {running} was running: {entries}"
            running = e["name"]
            order.append(e["name"])
        elif e["event"] == "stop":
            assert running == e["name"], f"unexpected stop of {e['name']}: {entries}"
            running = None
    return order
