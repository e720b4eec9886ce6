"""Fast tests of single Lua transitions against a real Redis (no worker, seconds).

Each uses a partition of its own, so nothing it writes meets another test.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest
from celery import Celery

from celery_roger import Roger
from celery_roger.store import Store


@pytest.fixture
def store(redis_url: str) -> Store:
    app = Celery("lua-tests", broker=redis_url, backend=redis_url)
    app.conf.update(roger_redis_url=redis_url, roger_partition=f"lua-{uuid.uuid4().hex[:8]}",
                    roger_lease_seconds=2, roger_publish_grace_seconds=1)
    return Roger(app).store


def message(job: str, ek: str, queue: str = "q") -> dict:
    return {"body": "e30=", "content_type": "application/json", "content_encoding": "utf-8",
            "headers": {"id": job, "roger": {"q": queue, "ek": ek}}, "properties": {},
            "exchange": "", "routing_key": queue}


def admit(store: Store, job: str, instance: str, ek: str) -> str:
    info = {"job": job, "instance": instance, "queue": "q", "ek": ek, "qk": ""}
    return store.admit(job, instance=instance, execution_key=ek, info=info,
                       message=message(job, ek)).outcome


# -- the lease -------------------------------------------------------------------------------------


def test_a_lease_that_ran_out_is_not_renewed(store):
    assert store.renew("w1", registered=False)
    assert store.renew("w1")
    store.redis.zadd(store.k_workers, {"w1": 0})  # it ran out (a stopped worker)
    assert not store.renew("w1")
    assert store.renew("w1", registered=False)  # registering again is allowed


def test_admission_needs_a_live_lease(store):
    assert admit(store, "j1", "nobody", "k") == "nolease"
    assert store.execution_key_holder("k") is None
    store.renew("w1", registered=False)
    assert admit(store, "j1", "w1", "k") == "run"


# -- finish ----------------------------------------------------------------------------------------


def test_a_stale_attempt_releases_nothing_of_the_live_one(store):
    store.renew("old", registered=False)
    store.renew("new", registered=False)
    assert admit(store, "j1", "old", "k") == "run"
    # Healed as a dead worker's (record and key gone), then delivered again elsewhere.
    store.finish("j1", execution_key="k", instance="old")
    assert admit(store, "j1", "new", "k") == "run"
    assert admit(store, "j2", "new", "k") == "parked"
    finished = store.finish("j1", execution_key="k", instance="old")  # the stale attempt
    assert not finished.was_running and finished.promotion is None
    assert store.execution_key_holder("k") == "j1"
    finished = store.finish("j1", execution_key="k", instance="new")
    assert finished.was_running and finished.promotion is not None
    assert finished.promotion.job_id == "j2"


def test_a_forced_release_restarts_a_line_without_a_holder(store):
    store.renew("w", registered=False)
    admit(store, "j1", "w", "k")
    admit(store, "j2", "w", "k")
    store.redis.hdel(store.k_holders, "k")
    promotion = store.finish("", execution_key="k", force=True).promotion
    assert promotion is not None and promotion.job_id == "j2"


def test_a_promoted_job_that_ends_before_admission_leaves_no_message(store):
    store.renew("w", registered=False)
    admit(store, "j1", "w", "k")
    admit(store, "j2", "w", "k")
    store.finish("j1", execution_key="k", instance="w")  # j2 promoted
    store.confirm_promoted("j2")
    store.finish("j2", execution_key="k")  # revoked (expired) before its admission
    assert store.redis.hget(store.k_msg, "j2") is None
    assert store.execution_key_holder("k") is None


# -- poison ----------------------------------------------------------------------------------------


def test_a_key_of_the_wrong_type_is_moved_aside_before_any_write(store):
    store.redis.set(store.k_holders, "garbage")
    store.renew("w", registered=False)
    assert admit(store, "j1", "w", "k") == "run"
    record = store.quarantined()[store.k_holders]
    assert record["type"] == "string" and record["expected"] == "hash"
    assert store.redis.get(record["moved_to"]) == b"garbage"
    assert store.execution_key_holder("k") == "j1"
    assert int(store.redis.hget(store.k_stats, "quarantined")) == 1
    logged = store.tick().quarantined
    assert [r["key"] for r in logged] == [store.k_holders]
    assert store.tick().quarantined == []  # logged once


@pytest.mark.parametrize("bad", [b"not json", b"[1, 2]", b"5", b'{"instance": "w\xff"}'])
def test_an_unreadable_running_record_is_quarantined_by_the_tick(store, bad):
    store.redis.zadd(store.k_workers, {"dead": 0})
    store.redis.hset(store.k_running, "ghost", bad)
    result = store.tick()
    assert result.orphans == []
    assert store.redis.hget(store.k_running, "ghost") is None
    assert f"{store.k_running}#ghost" in store.quarantined()


def test_an_unreadable_parked_message_is_skipped_and_the_line_moves_on(store):
    store.renew("w", registered=False)
    admit(store, "j1", "w", "k")
    admit(store, "j2", "w", "k")
    admit(store, "j3", "w", "k")
    store.redis.hset(store.k_msg, "j2", "{not json")
    promotion = store.finish("j1", execution_key="k", instance="w").promotion
    assert promotion is not None and promotion.job_id == "j3"
    assert f"{store.k_msg}#j2" in store.quarantined()


def test_an_unreadable_pause_record_keeps_the_queue_paused(store):
    store.redis.hset(store.k_paused, "q", "nope")
    assert store.paused() == {"q": {"at": None, "reason": None}}
    assert f"{store.k_paused}#q" in store.quarantined()


# -- the sweep -------------------------------------------------------------------------------------


def sweep(store: Store, threshold: float) -> list[tuple[str, str, str]]:
    store.redis.hdel(store.k_sweep, "next")  # this caller's turn
    return store.sweep_keys(period=0.01, threshold=threshold, count=1000) or []


def test_a_queue_key_whose_job_is_nowhere_is_released_after_two_sightings(store):
    assert store.take_queue_key("qk", "lost") is None
    store.confirm_queue_key("qk", "lost")
    store.take_queue_key("pending", "fresh")  # unconfirmed: its publisher's grace
    assert sweep(store, 0.2) == []  # first sighting
    assert sweep(store, 0.2) == []  # too early
    time.sleep(0.25)
    assert sweep(store, 0.2) == [("q", "lost", "qk")]
    assert store.orphan("q", "lost", "qk", release=True) == 1
    assert store.queue_key_holder("qk") is None
    assert store.queue_key_holder("pending") == "fresh"
    assert int(store.redis.hget(store.k_stats, "orphaned_keys")) == 1


def test_a_suspect_found_in_the_broker_waits_again(store):
    store.take_queue_key("qk", "waiting")
    store.confirm_queue_key("qk", "waiting")
    sweep(store, 0.1)
    time.sleep(0.15)
    assert sweep(store, 0.1) == [("q", "waiting", "qk")]
    assert store.orphan("q", "waiting", "qk", release=False) == 0
    assert sweep(store, 0.1) == []  # its wait started again
    assert store.queue_key_holder("qk") == "waiting"


def test_a_promoted_job_lost_in_flight_is_promoted_again(store):
    store.renew("w", registered=False)
    admit(store, "j1", "w", "k")
    admit(store, "j2", "w", "k")
    store.finish("j1", execution_key="k", instance="w")
    store.confirm_promoted("j2")  # published, then lost in flight
    sweep(store, 0.1)
    time.sleep(0.15)
    assert sweep(store, 0.1) == [("e", "j2", "k")]
    assert store.orphan("e", "j2", "k", release=True) == 2
    republish = store.tick().republish
    assert [p.job_id for p in republish] == ["j2"]
    assert json.loads(json.dumps(republish[0].message))["headers"]["id"] == "j2"


def test_a_running_job_is_never_a_suspect(store):
    store.renew("w", registered=False)
    admit(store, "j1", "w", "k")
    store.take_queue_key("qk", "j1")
    store.confirm_queue_key("qk", "j1")
    store.redis.hset(store.k_running, "j1", json.dumps({"job": "j1", "instance": "w"}))
    sweep(store, 0.0)
    assert sweep(store, 0.0) == []
