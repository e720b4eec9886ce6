"""The console's lists (``Roger(app).browse``) against a real Redis: each kind, its
filters, its cursors, and the buried queue's indexes kept by every script that touches
the buried queue. Each test uses a partition of its own."""

from __future__ import annotations

import uuid

import pytest
from celery import Celery

from celery_roger import Roger
from celery_roger.store import Store

from .test_transitions import admit, entry


@pytest.fixture
def roger(redis_url: str) -> Roger:
    app = Celery("list-tests", broker=redis_url, backend=redis_url)
    app.conf.update(roger_redis_url=redis_url, roger_partition=f"ls-{uuid.uuid4().hex[:8]}",
                    roger_buried_max=50)
    return Roger(app)


def bury(store: Store, job: str, queue: str = "q", task: str = "t",
         error: str = "ValueError") -> None:
    store.bury(job, queue, {"id": job, "task": task, "queue": queue, "args": [1],
                            "kwargs": {}, "error": f"{error}: boom", "error_type": error,
                            "traceback": "Traceback ...", "kind": "buried",
                            "publish": entry(job, queue)})


def walk(roger: Roger, kind: str, limit: int, **filters) -> list[list[str]]:
    """Every page of a list, as the ids (or keys) of each page."""
    pages, cursor = [], None
    while True:
        page = roger.browse(kind, limit=limit, cursor=cursor, **filters)
        pages.append([i.get("id", i.get("key")) for i in page["items"]])
        cursor = page["cursor"]
        if cursor is None:
            return pages
        assert len(pages) < 100, "the cursor never ends"


def flat(pages: list[list[str]]) -> list[str]:
    return [x for page in pages for x in page]


def indexes(store: Store) -> dict[str, object]:
    r = store.redis
    found = {k.decode(): sorted(m.decode() for m in r.zrange(k, 0, -1))
             for k in r.scan_iter(store.prefix + "buried_by_*")}
    found["tags"] = sorted(r.hkeys(store.prefix + "buried_tags"))
    found["facets"] = {k.decode(): int(v) for k, v in
                       r.hgetall(store.prefix + "buried_facets").items()}
    return found


def test_buried_pages_filter_by_task_error_queue_and_time(roger):
    store = roger.store
    for i in range(12):
        bury(store, f"j{i:02}", queue="a" if i % 2 else "b", task="t1" if i < 6 else "t2",
             error="KeyError" if i % 3 == 0 else "ValueError")
    newest_first = [f"j{i:02}" for i in reversed(range(12))]
    assert flat(walk(roger, "buried", 5)) == newest_first
    assert [len(p) for p in walk(roger, "buried", 5)] == [5, 5, 2]
    assert roger.browse("buried", limit=5)["total"] == 12

    by_task = roger.browse("buried", limit=50, task="t1")
    assert [j["id"] for j in by_task["items"]] == [f"j{i:02}" for i in (5, 4, 3, 2, 1, 0)]
    assert by_task["total"] == 6, "a task filter reads its index: the total is known"
    both = roger.browse("buried", limit=50, task="t2", error="KeyError", queue="b")
    assert [j["id"] for j in both["items"]] == ["j06"]
    assert both["items"][0]["args"] == [1] and both["items"][0]["traceback"]
    assert [j["id"] for j in roger.browse("buried", limit=50, error="KeyError")["items"]] == \
        ["j09", "j06", "j03", "j00"]

    times = [j["buried_at"] for j in roger.browse("buried", limit=50)["items"]]
    middle = roger.browse("buried", limit=50, since=times[8], until=times[3])
    assert [j["id"] for j in middle["items"]] == newest_first[3:9]
    assert roger.buried_facets() == {"task": {"t1": 6, "t2": 6},
                                     "error": {"KeyError": 4, "ValueError": 8},
                                     "queue": {"a": 6, "b": 6}}


def test_every_way_out_of_the_buried_queue_keeps_its_indexes(roger):
    store = roger.store
    for i in range(6):
        bury(store, f"j{i}", queue="a" if i < 3 else "b", task=f"t{i % 2}")
    assert roger.purge_buried_jobs(["j0", "nope"]) == 1
    store.unbury("j1", "a")
    assert roger.purge_buried("b") == 3
    assert indexes(store) == {f"{store.prefix}buried_by_task:t0": ["j2"],
                              f"{store.prefix}buried_by_error:ValueError": ["j2"],
                              "tags": [b"j2"], "facets": {"task:t0": 1, "error:ValueError": 1}}
    # over roger_buried_max (50), the oldest are dropped with their index entries
    for i in range(60):
        bury(store, f"k{i:02}", queue="a", task="t9")
    assert roger.buried_facets()["task"] == {"t9": 50}, "j2 and k00..k09 were dropped"
    assert flat(walk(roger, "buried", 20, task="t9")) == [f"k{i:02}" for i in
                                                              reversed(range(10, 60))]
    # burying a job again (same id) moves it in the indexes, never counts it twice
    bury(store, "k59", queue="a", task="t8")
    assert roger.buried_facets()["task"]["t8"] == 1
    assert "k59" not in flat(walk(roger, "buried", 50, task="t9"))


def test_a_cursor_survives_ties_and_removals(roger):
    store = roger.store
    for i in range(7):
        bury(store, f"j{i}")
    store.redis.zadd(store.k_buried, {f"j{i}": 1_000_000 for i in range(7)})  # one time
    first = roger.browse("buried", limit=3)
    assert [j["id"] for j in first["items"]] == ["j6", "j5", "j4"]
    roger.purge_buried_jobs(["j5", "j3"])
    rest = walk(roger, "buried", 3)
    assert flat(rest) == ["j6", "j4", "j2", "j1", "j0"]
    after = roger.browse("buried", limit=3, cursor=first["cursor"])
    assert [j["id"] for j in after["items"]] == ["j2", "j1", "j0"]


def test_parked_lines_and_held_keys(roger):
    store = roger.store
    store.renew("w1", registered=False)
    assert admit(store, "h", "ek:a") == "run"
    for i in range(5):
        assert admit(store, f"p{i}", "ek:a") == "parked"
    assert admit(store, "h2", "ek:b") == "run"
    assert admit(store, "q", "other") == "run"
    lines = roger.browse("parked", limit=10)
    assert lines["items"] == [{"key": "ek:a", "slot": 1, "holder": "h", "parked": 5}]
    assert lines["total"] == 5
    line = walk(roger, "parked", 2, key="ek:a")
    assert line == [["p0", "p1"], ["p2", "p3"], ["p4"]]
    second = roger.browse("parked", limit=2, key="ek:a", cursor="2")["items"]
    assert [(j["position"], j["queue"], j["execution_key"]) for j in second] == \
        [(3, "q", "ek:a"), (4, "q", "ek:a")]
    keys = roger.browse("execution_keys", limit=10, prefix="ek:")
    assert [(k["key"], k["holder"], k["parked"]) for k in keys["items"]] == \
        [("ek:a", "h", 5), ("ek:b", "h2", 0)]
    assert roger.browse("execution_keys", limit=10)["total"] == 3


def test_queue_keys_retries_held_cancelled_and_running(roger):
    store = roger.store
    store.take_queue_key("qk:1", "a")
    store.confirm_queue_key("qk:1", "a")
    store.take_queue_key("qk:2", "b")
    store.take_queue_key("other", "c")
    found = roger.browse("queue_keys", limit=10, prefix="qk:")["items"]
    assert [(k["key"], k["job"], k["pending_until"] is not None) for k in found] == \
        [("qk:1", "a", False), ("qk:2", "b", True)]

    for i, queue in enumerate(["x", "y", "x"]):
        store.schedule_retry(f"r{i}", 10 + i, entry(f"r{i}", queue))
    retries = roger.browse("retries", limit=10, queue="x")
    assert [j["id"] for j in retries["items"]] == ["r0", "r2"] and retries["total"] is None
    assert roger.browse("retries", limit=10)["total"] == 3
    assert retries["items"][0]["due_at"] < retries["items"][1]["due_at"]

    store.pause("x", None)
    store.hold("h1", "x", entry("h1", "x"))
    store.hold("h2", "x", entry("h2", "x"))
    store.pause("y", None)
    store.hold("h3", "y", entry("h3", "y"))
    assert walk(roger, "held", 2) == [["h1", "h2"], ["h3"]]
    assert [(j["id"], j["queue"], j["position"]) for j in
            roger.browse("held", limit=5, queue="y")["items"]] == [("h3", "y", 1)]

    roger.cancel("c1")
    assert [j["id"] for j in roger.browse("cancelled", limit=5)["items"]] == ["c1"]

    store.renew("w1", registered=False)
    admit(store, "run1", "e1")
    running = roger.browse("running", limit=10, queue="q")
    assert [j["id"] for j in running["items"]] == ["run1"]
    assert roger.browse("running", limit=10, queue="nope")["items"] == []


@pytest.mark.parametrize("call, message", [
    (lambda r: r.browse("everything"), "kind must be one of"),
    (lambda r: r.browse("buried", limit=0), "limit must be an int from 1 to 500"),
    (lambda r: r.browse("buried", limit=501), "limit must be an int from 1 to 500"),
    (lambda r: r.browse("buried", colour="red"), "unknown filter 'colour'"),
    (lambda r: r.browse("buried", since="yesterday"), "since must be Unix seconds"),
    (lambda r: r.browse("buried", task=""), "filter task must be a non-empty str"),
    (lambda r: r.browse("buried", cursor="garbage"), "is not a sorted cursor"),
    (lambda r: r.browse("parked", key="k", cursor="x"), "is not a cursor from this list"),
    (lambda r: r.browse("running", cursor="-3"), "cursor must be >= 0"),
    (lambda r: r.purge_buried_jobs("j1"), "job_ids must be a list"),
])
def test_bad_input_is_named(roger, call, message):
    with pytest.raises(ValueError, match=message):
        call(roger)


def test_garbage_counts_and_odd_names_never_break_a_burial(roger):
    store = roger.store
    store.redis.hset(store.prefix + "buried_facets", "task:t", "not a number")
    bury(store, "j1", task="t")  # the script goes on: a garbage count counts as 0
    assert roger.buried_facets()["task"] == {"t": 1}
    bury(store, "j2", task="line\nbreak", error="Odd\tError")
    assert [j["id"] for j in roger.browse("buried", task="line\nbreak")["items"]] == ["j2"]
    assert roger.purge_buried_jobs(["j2"]) == 1
    assert "line\nbreak" not in roger.buried_facets()["task"]
    assert not store.redis.exists(store.prefix + "buried_by_task:line\nbreak")
    assert roger.browse("buried")["total"] == 1


def test_a_prefix_that_matches_nothing_ends_the_page_within_its_budget(roger):
    store = roger.store
    store.redis.hset(store.k_holders, mapping={f"k{i}": f"j{i}" for i in range(20_000)})
    calls = []
    original = store.redis.hscan
    store.redis.hscan = lambda *a, **k: calls.append(a) or original(*a, **k)  # type: ignore[method-assign]
    try:
        page = roger.browse("execution_keys", limit=1, prefix="zz")
    finally:
        del store.redis.hscan
    assert page["items"] == [] and page["cursor"] is not None, "it stops with a cursor"
    assert len(calls) <= 100, f"{len(calls)} HSCAN calls for one page"
