"""The console's JSON API over HTTP, against a real ``celery roger dashboard``: the lists
and their cursors, the buried queue's filters, bulk actions, releasing a key, labelled
tokens and the audit log. Each test has a partition of its own."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import pytest
from celery import Celery

from celery_roger import Roger
from celery_roger.errors import ConfigurationError

from .fast.test_lists import bury
from .fast.test_transitions import admit
from .test_inspection import dashboard  # noqa: F401 (fixture)

TOKENS = {"alice": "alice-token", "deploy-bot": "bot-token"}


@pytest.fixture
def console(redis_url, broker_url, run, dashboard):  # noqa: F811
    """(base URL, Roger of the dashboard's partition): a dashboard with ``--token s3cret``
    and the labelled tokens of ``TOKENS``."""
    partition = f"console-{run}"
    app = Celery("console-tests", broker=broker_url, backend=redis_url)
    app.conf.update(roger_redis_url=redis_url, roger_partition=partition)
    settings = json.dumps({"roger_dashboard_tokens": TOKENS})
    base = dashboard("--token", "s3cret", env={"ROGER_TEST_PARTITION": partition,
                                               "ROGER_TEST_SETTINGS": settings})
    yield base, Roger(app)
    app.close()


def call(method: str, url: str, token: str | None = None, body: Any = None,
         ) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else (b"" if method == "POST"
                                                                else None)
    req = urllib.request.Request(url, method=method, data=data)
    req.add_header("Content-Type", "application/json")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_lists_page_with_cursors_and_filters_over_http(console):
    base, roger = console
    store = roger.store
    for i in range(7):
        bury(store, f"b{i}", queue="qa" if i < 4 else "qb", task="t.one" if i % 2 else "t.two",
             error="KeyError" if i == 6 else "ValueError")
    ids, cursor, pages = [], None, 0
    while True:
        status, page = call("GET", f"{base}/api/roger/lists/buried?limit=3&queue=qa"
                            + (f"&cursor={urllib.parse.quote(cursor)}" if cursor else ""))
        assert status == 200, page
        ids += [j["id"] for j in page["items"]]
        pages += 1
        cursor = page["cursor"]
        if not cursor:
            break
    assert ids == ["b3", "b2", "b1", "b0"] and pages == 2
    status, page = call("GET", f"{base}/api/roger/lists/buried?task=t.two&error=KeyError")
    assert [j["id"] for j in page["items"]] == ["b6"]
    assert page["items"][0]["traceback"] and page["items"][0]["error"] == "KeyError: boom"
    assert call("GET", f"{base}/api/roger/buried/facets")[1] == {
        "task": {"t.one": 3, "t.two": 4}, "error": {"KeyError": 1, "ValueError": 6},
        "queue": {"qa": 4, "qb": 3}}

    store.renew("w1", registered=False)
    admit(store, "holder", "ek:1")
    admit(store, "p1", "ek:1")
    admit(store, "p2", "ek:1")
    status, line = call("GET", f"{base}/api/roger/lists/parked?key=ek:1&limit=1&cursor=1")
    assert [(j["id"], j["position"]) for j in line["items"]] == [("p2", 2)]
    assert line["total"] == 2 and line["cursor"] is None
    status, keys = call("GET", f"{base}/api/roger/lists/execution_keys?prefix=ek:")
    assert keys["items"] == [{"key": "ek:1", "slot": 1, "holder": "holder", "parked": 2}]

    for url, message in [
        ("lists/everything", "kind must be one of"),
        ("lists/buried?limit=0", "limit must be from 1 to 500"),
        ("lists/buried?since=yesterday", "since must be Unix seconds"),
        ("lists/buried?cursor=nonsense", "not a sorted cursor"),
        ("audit?offset=-1", "offset must be from 0"),
    ]:
        status, body = call("GET", f"{base}/api/roger/{url}")
        assert status == 400 and message in body["error"], (url, body)


def test_bulk_actions_are_guarded_labelled_and_audited(console, run):
    base, roger = console
    store = roger.store
    for i in range(4):
        bury(store, f"{run}-{i}", queue=f"q-{run}")
    ids = [f"{run}-{i}" for i in range(4)]
    purge = f"{base}/api/roger/buried/purge"
    assert call("POST", purge, body={"ids": ids[:2]})[0] == 401
    assert call("POST", purge, "not-a-token", body={"ids": ids[:2]})[0] == 403
    status, body = call("POST", purge, "bot-token", body={"ids": ids[:2]})
    assert status == 200 and body["purged"] == 2 and body["audited"]
    status, body = call("POST", f"{base}/api/roger/buried/requeue", "alice-token",
                        body={"ids": [ids[2], "nope"]})
    assert body["requeued"] == 1 and body["results"] == {ids[2]: True, "nope": False}
    assert [j.id for j in roger.buried(f"q-{run}")] == [ids[3]], "one left buried"

    status, body = call("POST", f"{base}/api/roger/jobs/cancel", "s3cret",
                        body={"ids": ["c1", "c2"]})
    assert status == 200 and store.is_cancelled("c1") and store.is_cancelled("c2")
    assert [(e["event"], e["detail"]) for e in roger.job("c1")["history"]] == \
        [("cancelled", "by default (dashboard)")], "the job's history says who"

    store.take_queue_key("qk-held", "someone")
    status, body = call("POST", f"{base}/api/roger/keys/queue/release", "alice-token",
                        body={"key": "qk-held"})
    assert body["holder"] == "someone" and store.queue_key_holder("qk-held") is None
    assert call("POST", f"{base}/api/roger/keys/queue/release", "alice-token",
                body={})[1]["error"] == 'the body must be JSON {"key": "<the key>"}'
    # A body that is not JSON (curl's form encoding, a cut-off body) purges nothing.
    req = urllib.request.Request(purge, method="POST", data=b"ids=x",
                                 headers={"Authorization": "Bearer bot-token"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=10)
    assert refused.value.code == 400 and [j.id for j in roger.buried(f"q-{run}")] == [ids[3]]
    status, body = call("POST", f"{base}/api/roger/jobs/cancel", "s3cret",
                        body={"ids": [f"many-{i}" for i in range(30)]})
    status, body = call("POST", purge, "bot-token", body={"ids": []})
    assert status == 400 and "at least one id" in body["error"]
    status, body = call("POST", purge, "bot-token", body={"ids": ["x"] * 1001})
    assert status == 400 and "at most 1000 ids" in body["error"]

    status, log = call("GET", f"{base}/api/roger/audit?limit=10")
    many = log["items"][0]
    assert many["target"] == "30 jobs" and many["result"]["ids_count"] == 30
    assert len(many["result"]["ids"]) == 20, "a bulk action's entry keeps a sample of ids"
    del log["items"][0]
    assert [(e["label"], e["action"], e["target"]) for e in log["items"]] == [
        ("alice", "release queue key", "qk-held"),
        ("default", "cancel", "2 jobs"),
        ("alice", "requeue", "2 buried jobs"),
        ("deploy-bot", "purge", "2 buried jobs"),
    ], "newest first; refused calls are not actions"
    assert log["items"][3]["result"]["ids"] == ids[:2] and log["total"] == 5
    assert all(isinstance(e["at"], float) for e in log["items"])


@pytest.mark.parametrize("tokens, message", [
    ("alice:secret", "must be a dict of label -> token"),
    ({"": "x"}, "label '' must be a str of 1 to 64 printable characters"),
    ({"alice": ""}, "the token of 'alice' must be a non-empty str"),
    ({"alice": "same", "bob": "same"}, "two labels share one token"),
])
def test_bad_labelled_tokens_are_named(redis_url, tokens, message):
    app = Celery("bad-tokens", broker=redis_url)
    app.conf.update(roger_redis_url=redis_url, roger_dashboard_tokens=tokens)
    with pytest.raises(ConfigurationError, match=message):
        Roger(app)
    app.close()


def test_the_default_token_cannot_be_labelled_twice(redis_url):
    from celery_roger.dashboard import create_app

    app = Celery("dup-tokens", broker=redis_url)
    app.conf.update(roger_redis_url=redis_url, roger_dashboard_tokens={"default": "x"})
    with pytest.raises(ConfigurationError, match="labels a token 'default'"):
        create_app(Roger(app), "y")
    app.close()
    app = Celery("dup-tokens-2", broker=redis_url)
    app.conf.update(roger_redis_url=redis_url, roger_dashboard_tokens={"bob": "y"})
    with pytest.raises(ConfigurationError, match="is also one of roger_dashboard_tokens"):
        create_app(Roger(app), "y")
    app.close()
