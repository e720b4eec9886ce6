"""ScriptPipe (celery_roger/pipe.py) on a real kombu Hub and a real Redis of its own:
replies reach their calls in order, an error reply fails only its call, and a lost
connection, a reset loop or a stalled Redis fail the calls in flight (nothing waits for
ever), after which the next call connects again."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu.asynchronous import Hub

from celery_roger import pipe as pipe_module
from celery_roger.pipe import LoopClosed, ScriptPipe, can_pipe
from celery_roger.testing import RedisServer

ECHO = "return ARGV[1]"


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer() as s:
        yield s


@pytest.fixture
def hub() -> Iterator[Hub]:
    h = Hub()
    yield h
    h.close()


def calls(p: ScriptPipe, sha: str, values: list[str]) -> tuple[list[Any], list[Exception]]:
    replies: list[Any] = []
    errors: list[Exception] = []
    for v in values:
        p.send(sha, [], [v], replies.append, errors.append)
    return replies, errors


def spin(hub: Hub, until: Any, timeout: float = 5.0) -> None:
    """Run the loop until ``until()`` holds."""
    loop = hub.create_loop()
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "the loop did not deliver the replies in time"
        next(loop)


def test_replies_reach_their_calls_in_the_order_sent(server, hub):
    client = redis.Redis.from_url(server.url)
    assert can_pipe(client)
    sha = client.script_load(ECHO)
    p = ScriptPipe(client, hub)
    replies, errors = calls(p, sha, [str(i) for i in range(200)])
    assert p.in_flight == 200, "sent without waiting"
    spin(hub, lambda: len(replies) == 200)
    assert [int(r) for r in replies] == list(range(200)) and errors == []


def test_an_error_reply_fails_only_its_own_call(server, hub):
    client = redis.Redis.from_url(server.url)
    sha = client.script_load(ECHO)
    p = ScriptPipe(client, hub)
    replies: list[Any] = []
    errors: list[Exception] = []
    p.send(sha, [], ["a"], replies.append, errors.append)
    p.send("0" * 40, [], ["b"], replies.append, errors.append)  # NOSCRIPT
    p.send(sha, [], ["c"], replies.append, errors.append)
    spin(hub, lambda: len(replies) + len(errors) == 3)
    assert replies == [b"a", b"c"]
    assert len(errors) == 1 and isinstance(errors[0], redis.exceptions.NoScriptError)


def warm(p: ScriptPipe, hub: Hub, sha: str) -> None:
    """One call answered: the pipe's connection is open."""
    replies, _ = calls(p, sha, ["warm"])
    spin(hub, lambda: replies)


def test_a_lost_connection_fails_the_calls_in_flight_then_connects_again(server, hub):
    client = redis.Redis.from_url(server.url)
    sha = client.script_load(ECHO)
    p = ScriptPipe(client, hub)
    warm(p, hub, sha)
    os.kill(server.process.pid, signal.SIGSTOP)  # the calls are sent; no reply comes
    replies, errors = calls(p, sha, ["x", "y"])
    server.process.kill()  # Redis dies with them
    server.process.wait()
    server.process = None
    spin(hub, lambda: len(errors) == 2)
    assert replies == [] and all(isinstance(e, redis.exceptions.RedisError) for e in errors)
    server.start()
    client.script_load(ECHO)
    replies2, errors2 = calls(p, sha, ["z"])
    spin(hub, lambda: replies2 or errors2)
    assert replies2 == [b"z"], errors2


def test_a_reset_loop_reads_the_replies_due_and_fails_the_rest_as_closed(server, hub,
                                                                         monkeypatch):
    monkeypatch.setattr(pipe_module, "CLOSE_DRAIN_SECONDS", 0.3)
    client = redis.Redis.from_url(server.url)
    sha = client.script_load(ECHO)
    told: list[bool] = []
    p = ScriptPipe(client, hub, before_close=lambda: told.append(True))
    replies, errors = calls(p, sha, ["a", "b"])
    hub.reset()  # what Celery's loop does when the broker connection is lost
    assert told == [True], "the caller is told first, so it acts on these replies as such"
    assert replies == [b"a", b"b"] and errors == [], "replies already due are read"
    warm(p, hub, sha)  # connected again, then Redis stops answering
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        replies2, errors2 = calls(p, sha, ["c"])
        hub.reset()
        assert replies2 == [] and len(errors2) == 1 and isinstance(errors2[0], LoopClosed)
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
    replies3, _ = calls(p, sha, ["d"])
    spin(hub, lambda: replies3)
    assert replies3 == [b"d"], "connected again, on the new poller"


def test_an_idle_connection_closed_by_redis_is_dropped_not_spun_on(server, hub):
    client = redis.Redis.from_url(server.url)
    sha = client.script_load(ECHO)
    p = ScriptPipe(client, hub)
    warm(p, hub, sha)
    client.client_kill_filter(_type="normal", skipme=True)  # Redis drops the pipe's one
    loop = hub.create_loop()
    deadline = time.monotonic() + 5
    while p._conn is not None:  # the loop finds it readable once: it is closed
        assert time.monotonic() < deadline, "the closed connection was never dropped"
        next(loop)
    replies, errors = calls(p, sha, ["again"])
    spin(hub, lambda: replies or errors)
    assert replies == [b"again"], errors


def test_a_stalled_redis_fails_the_calls_after_the_stall_limit(server, hub, monkeypatch):
    monkeypatch.setattr(pipe_module, "STALL_SECONDS", 0.3)
    client = redis.Redis.from_url(server.url)
    sha = client.script_load(ECHO)
    p = ScriptPipe(client, hub)
    warm(p, hub, sha)
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        replies, errors = calls(p, sha, ["a"])
        time.sleep(0.4)
        p.poll()  # the worker's watch, each second
        assert replies == [] and len(errors) == 1
        assert isinstance(errors[0], redis.exceptions.TimeoutError)
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
