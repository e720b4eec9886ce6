"""migrate.lua: state kept under the key names of celery-roger before 0.2 moves to today's
names when a worker of this version starts, or the worker refuses while workers of the
older version still hold a live lease (docs/design.md, "Renamed keys")."""

from __future__ import annotations

import json
import uuid

import pytest
from celery import Celery

from celery_roger import Roger
from celery_roger.store import Store


@pytest.fixture
def store(redis_url: str) -> Store:
    app = Celery("migration-tests", broker=redis_url, backend=redis_url)
    app.conf.update(roger_redis_url=redis_url, roger_partition=f"mig-{uuid.uuid4().hex[:8]}",
                    roger_lease_seconds=2)
    return Roger(app).store


def old_state(store: Store) -> None:
    """What a worker of 0.1 leaves: a holder, and a job held for a paused queue."""
    r, p = store.redis, store.prefix
    r.hset(p + "held", "ek-1", "job-holder")
    r.hset(p + "paused_msg", "job-held", json.dumps({"queue": "reports", "raw": {}}))
    r.rpush(p + "pausedjobs:reports", "job-held")
    r.sadd(p + "paused_lists", "reports")
    r.hset(store.k_paused, "reports", json.dumps({"at": 1.0}))


def test_old_state_moves_to_the_new_names(store):
    old_state(store)
    outcome, detail = store.migrate()
    assert (outcome, detail) == ("migrated", ["4", "0"])  # 3 keys and a list
    r, p = store.redis, store.prefix
    assert store.execution_key_holder("ek-1") == "job-holder"
    assert r.lrange(store.held_key("reports"), 0, -1) == [b"job-held"]
    assert r.hexists(store.k_held_msg, "job-held")
    assert r.smembers(store.k_held_queues) == {b"reports"}
    assert not r.exists(p + "held", p + "paused_msg", p + "paused_lists",
                        p + "pausedjobs:reports")
    assert store.migrate() == ("current", [])


def test_a_migrated_held_job_is_released_by_resume(store):
    old_state(store)
    store.migrate()
    assert store.held_count("reports") == 1
    assert store.resume("reports") == 1
    assert [d.job_id for d in store.take_due()] == ["job-held"]


def test_refused_while_an_older_worker_holds_a_live_lease(store):
    old_state(store)
    store.redis.zadd(store.k_workers, {"old-host/1/abc": 10**13})  # far in the future
    outcome, live = store.migrate()
    assert (outcome, live) == ("refused", ["old-host/1/abc"])
    assert store.redis.hexists(store.prefix + "held", "ek-1"), "nothing moved"


def test_a_run_out_lease_of_an_older_worker_does_not_block(store):
    old_state(store)
    store.redis.zadd(store.k_workers, {"old-host/1/abc": 0})
    assert store.migrate()[0] == "migrated"


def test_a_worker_of_this_version_marks_the_partition_when_it_registers(store):
    assert store.renew("new-host/1/abc", registered=False)
    assert store.migrate() == ("current", []), "a live worker of this version is no older one"


def test_a_fresh_partition_is_marked_current(store):
    assert store.migrate() == ("migrated", ["0", "0"])
    assert store.migrate() == ("current", [])
