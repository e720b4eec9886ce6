"""Each Lua transition on its own against a real Redis (no worker): the ones test_lua.py
does not cover. Each test uses a partition of its own."""

from __future__ import annotations

import time
import uuid

import pytest
from celery import Celery

from celery_roger import Roger, store_reads
from celery_roger.records import compact
from celery_roger.store import Store


@pytest.fixture
def store(redis_url: str) -> Store:
    app = Celery("transition-tests", broker=redis_url, backend=redis_url)
    app.conf.update(roger_redis_url=redis_url, roger_partition=f"tr-{uuid.uuid4().hex[:8]}",
                    roger_lease_seconds=2, roger_buried_max=2)
    store = Roger(app).store
    store.grace_ms = 200  # under the setting's 1 s minimum, to keep these tests fast
    return store


def message(job: str, ek: str = "", queue: str = "q", qk: str = "") -> dict:
    header = {"q": queue, "ek": ek, **({"qk": qk} if qk else {})}
    return {"kind": "message", "body": "e30=", "content_type": "application/json",
            "content_encoding": "utf-8", "headers": {"id": job, "roger": header},
            "properties": {}, "exchange": "", "routing_key": queue}


def entry(job: str, queue: str = "q", qk: str = "") -> dict:
    return {"kind": "entry", "task": "t", "args": [], "kwargs": {},
            "options": {"task_id": job, "headers": {"roger": {"q": queue, "qk": qk}}}}


def admit(store: Store, job: str, ek: str, instance: str = "w1", qk: str = "",
          limit: int = 1) -> str:
    info = {"job": job, "instance": instance, "queue": "q", "ek": ek, "qk": qk}
    return store.admit(job, instance=instance, execution_key=ek, info=info,
                       message=message(job, ek, qk=qk), limit=limit).outcome


# -- queue keys ---------------------------------------------------------------------------


def test_take_confirm_release_a_queue_key(store):
    assert store.take_queue_key("k", "j1") is None
    assert store.take_queue_key("k", "j2") == "j1", "a second publish is refused"
    assert store.confirm_queue_key("k", "j1")
    assert not store.confirm_queue_key("k", "j2"), "only its holder confirms it"
    assert store.release_queue_key("k", "j2") is None, "compare-and-delete"
    assert store.release_queue_key("k", "j1") == "j1"
    assert store.queue_key_holder("k") is None


def test_an_unconfirmed_queue_key_is_freed_after_the_grace(store):
    store.take_queue_key("k", "j1")
    time.sleep(0.3)
    assert store.tick().freed_queue_keys == ["k"]
    assert store.queue_key_holder("k") is None


# -- execution keys: park, finish, promote ---------------------------------------------------


def test_parked_jobs_are_promoted_in_order_and_confirmed(store):
    store.renew("w1", registered=False)
    assert admit(store, "a", "e") == "run"
    assert admit(store, "b", "e") == "parked" and admit(store, "c", "e") == "parked"
    assert store.parked_ids("e") == ["b", "c"]
    done = store.finish("a", execution_key="e", instance="w1")
    assert done.was_running and done.promotion is not None and done.promotion.job_id == "b"
    assert store.execution_key_holder("e") == "b", "the key is handed on, never free"
    time.sleep(0.3)
    assert [p.job_id for p in store.tick().republish] == ["b"], "unconfirmed: republished"
    store.confirm_promoted("b")
    assert admit(store, "b", "e") == "run", "the promoted job picks up its key"
    assert store.parked_ids("e") == ["c"]


def test_a_parked_kombu_payload_is_pushed_by_finish_to_the_head_of_its_list(store):
    """Fused promotion: finish.lua pushes the parked job's kombu payload itself, where
    BRPOP takes next; nothing to publish, nothing to confirm."""
    lst = f"{store.prefix}test-broker-list"  # a broker list, in this partition's slot
    store.redis.delete(lst)
    store.redis.lpush(lst, "queued-after")
    store.renew("w1", registered=False)
    assert admit(store, "a", "e") == "run"
    parked = {**message("b", "e"), "kombu_payload": '{"b": 1}', "kombu_list": lst}
    info = {"job": "b", "instance": "w1", "queue": "q", "ek": "e", "qk": ""}
    assert store.admit("b", instance="w1", execution_key="e", info=info,
                       message=parked).outcome == "parked"
    done = store.finish("a", execution_key="e", instance="w1")
    assert done.promotion is not None and done.promotion.pushed
    assert done.promotion.job_id == "b" and store.execution_key_holder("e") == "b"
    assert store.redis.rpop(lst) == b'{"b": 1}', "the promoted job is the next one popped"
    time.sleep(0.3)
    assert store.tick().republish == [], "pushed: nothing to publish again"
    assert admit(store, "b", "e") == "run"
    store.redis.delete(lst)


def test_drop_parked_takes_a_job_out_of_its_line(store):
    store.renew("w1", registered=False)
    admit(store, "a", "e")
    admit(store, "b", "e")
    store.take_queue_key("qb", "b")
    assert store.drop_parked("b", execution_key="e", queue_key="qb", queue="q")
    assert store.parked_ids("e") == [] and store.queue_key_holder("qb") is None


# -- the start check -------------------------------------------------------------------------


def test_start_records_a_keyless_job_and_refuses_a_cancelled_one(store):
    store.renew("w1", registered=False)
    info = {"job": "j", "instance": "w1", "queue": "q", "ek": "", "qk": ""}
    assert store.start("j", "q", info, "w1")[0] == "run"
    assert "j" in store.running_on("w1")
    assert store.claim_cancel("k")
    assert store.start("k", "q", None, "w1")[:2] == ("cancelled", False), "claimed already"


def test_a_start_carries_the_previous_jobs_end_but_never_removes_a_later_attempt(store):
    # deferred.py: a pool process folds the end of its last job without keys into its
    # next start; the record goes only if it is still the one that attempt wrote.
    store.renew("w1", registered=False)
    first = compact({"job": "a", "instance": "w1", "pid": 7, "queue": "q"})
    assert store.start("a", "q", first, "w1")[0] == "run"
    assert store.start("b", "q", compact({"job": "b", "instance": "w1", "pid": 7}), "w1",
                       done={"done": "a", "done_record": first})[0] == "run"
    assert set(store.running_on("w1")) == {"b"}, "a's end rode on b's start"
    # a's message came back and a later attempt of it runs elsewhere: an old end of a
    # (carried by a start, or flushed alone) leaves that attempt's record alone
    store.renew("w2", registered=False)
    assert store.start("a", "q", compact({"job": "a", "instance": "w2", "pid": 9}), "w2")[0] \
        == "run"
    store.start("c", "q", None, "w1", done={"done": "a", "done_record": first})
    store.forget_ended("a", first)
    assert "a" in store.running_on("w2"), "the later attempt is still running"
    store.forget_ended("b", compact({"job": "b", "instance": "w1", "pid": 7}))
    assert "b" not in store.running_on("w1")


def test_start_holds_a_job_of_a_paused_queue(store):
    store.pause("q", "maintenance")
    assert store.start("j", "q", None, "w1")[0] == "paused"
    assert store.paused()["q"]["reason"] == "maintenance"


# -- cancel ------------------------------------------------------------------------------------


def test_cancel_takes_a_job_out_of_its_retry_and_reports_once(store):
    assert store.schedule_retry("j", 60, entry("j"))
    assert store.cancel("j") == (None, "retry")
    assert store.retry_due_at("j") is None
    assert store.is_cancelled("j")
    assert not store.claim_cancel("j"), "on_cancel is claimed once"
    assert not store.schedule_retry("j", 1, entry("j")), "a cancelled job is not retried"


def test_cancel_a_parked_job(store):
    store.renew("w1", registered=False)
    admit(store, "a", "e")
    store.take_queue_key("qb", "b")
    admit(store, "b", "e", qk="qb")
    assert store.cancel("b") == (None, "parked")
    assert store.parked_ids("e") == []
    assert store.queue_key_holder("qb") is None, "its queue key is released"
    assert store.cancel("a")[0] is not None, "a running job: its record is returned"


# -- retries ------------------------------------------------------------------------------------


def test_a_due_retry_is_taken_once_until_confirmed(store):
    store.schedule_retry("j", 0, entry("j"))
    (due,) = store.take_due()
    assert due.job_id == "j" and due.entry["task"] == "t"
    assert store.take_due() == [], "taken: no other tick takes it before the grace"
    store.confirm_retries([due])
    assert store.retry_due_at("j") is None


def test_an_unconfirmed_retry_is_taken_again_after_the_grace(store):
    store.schedule_retry("j", 0, entry("j"))
    store.take_due()
    time.sleep(0.3)
    assert [d.job_id for d in store.take_due()] == ["j"]


# -- pause, hold, resume --------------------------------------------------------------------


def test_held_jobs_are_due_on_resume_in_order(store):
    store.pause("q", None)
    store.hold("j1", "q", {"kind": "message", "raw": message("j1")})
    store.hold("j2", "q", entry("j2"))
    assert store.held_count("q") == 2
    assert store.resume("q") == 2
    assert "q" not in store.paused()
    assert [d.job_id for d in store.take_due()] == ["j1", "j2"]


def test_release_only_keeps_held_jobs_of_a_queue_still_paused(store):
    store.pause("q", None)
    store.hold("j1", "q", entry("j1"))
    assert store.resume("q", release_only=True) == 0
    assert store.held_count("q") == 1


# -- the buried queue ------------------------------------------------------------------------


def buried(job: str, qk: str = "") -> dict:
    return {"kind": "buried", "id": job, "task": "t", "queue": "q", "queue_key": qk,
            "error": "boom", "publish": entry(job, qk=qk)}


def test_bury_keeps_the_newest_up_to_the_cap(store):
    for job in ("a", "b", "c"):
        store.bury(job, "q", buried(job))
    assert store.buried_ids("q") == ["c", "b"]
    assert store_reads.buried_dropped(store) == {"q": 1}
    assert store.buried_queues() == ["q"]


def test_requeue_takes_the_queue_key_or_says_who_has_it(store):
    store.bury("a", "q", buried("a", qk="k"))
    store.take_queue_key("k", "other")
    assert store.requeue_take("a") == ("taken", "other")
    store.release_queue_key("k")
    outcome, taken = store.requeue_take("a")
    assert outcome == "ok" and taken["publish"]["task"] == "t"
    assert store.queue_key_holder("k") == "a"
    assert store.unbury("a", "q", "k")
    assert store.buried_ids("q") == []
    assert store.requeue_take("a") == ("missing", None)


def test_purge_buried(store):
    store.bury("a", "q", buried("a"))
    assert store.purge_buried("q") == 1
    assert store.buried_ids("q") == [] and store.buried_queues() == []


# -- healing ---------------------------------------------------------------------------------


def test_a_dead_workers_attempt_is_returned_by_the_tick(store):
    store.renew("dead", registered=False)
    admit(store, "a", "e", instance="dead")
    store.redis.zadd(store.k_workers, {"dead": 0})  # its lease ran out
    (orphan,) = store.tick().orphans
    assert orphan["job"] == "a" and orphan["instance"] == "dead"


# -- queue_key_until (issue 16) -------------------------------------------------------------


def test_a_throttle_window_outlasts_its_job_and_then_frees_the_key(store):
    assert store.take_queue_key("k", "j1") is None
    assert store.confirm_queue_key("k", "j1", window=0.6)
    store.finish("j1", queue_key="k")
    assert store.take_queue_key("k", "j2") == "j1", "refused for the window, job ended or not"
    assert store.orphan("queue", "j1", "k", release=True) == 0, "a window is not an orphan"
    time.sleep(0.7)
    assert store.take_queue_key("k", "j2") is None, "free once the window has ended"
    assert store.confirm_queue_key("k", "j2")
    store.finish("j2", queue_key="k")
    assert store.queue_key_holder("k") is None, "a key without a window goes at the end"


def test_a_throttle_window_keeps_the_key_while_its_job_still_waits(store):
    store.take_queue_key("k", "j1")
    store.confirm_queue_key("k", "j1", window=0.2)
    time.sleep(0.3)
    assert store.take_queue_key("k", "j2") == "j1", "held until the attempt ends, too"
    store.finish("j1", queue_key="k")
    assert store.take_queue_key("k", "j2") is None


def test_queue_key_until_start_releases_the_key_as_the_job_starts(store):
    store.take_queue_key("k", "j1")
    store.confirm_queue_key("k", "j1")
    assert store.start("j1", "q", queue_key="k")[0] == "run"
    assert store.take_queue_key("k", "j2") == "j1", "an ordinary start keeps it"
    assert store.start("j1", "q", queue_key="k", qk_release=True)[0] == "run"
    assert store.take_queue_key("k", "j2") is None, "released as it started"
    store.finish("j1", queue_key="k")
    assert store.queue_key_holder("k") == "j2", "its end leaves the new holder alone"


def test_a_release_by_hand_ends_a_throttle_window(store):
    store.take_queue_key("k", "j1")
    store.confirm_queue_key("k", "j1", window=60)
    assert store.release_queue_key("k") == "j1"
    assert store.take_queue_key("k", "j2") is None
    assert store.confirm_queue_key("k", "j2")
    store.finish("j2", queue_key="k")
    assert store.queue_key_holder("k") is None, "no window of j1 left over for j2"


# -- execution_limit: slots of an execution key (issue 16) ---------------------------------


def test_a_key_of_limit_3_runs_three_and_hands_each_freed_slot_to_the_next_in_line(store):
    store.renew("w1", registered=False)
    assert [admit(store, j, "e", limit=3) for j in "abc"] == ["run"] * 3
    assert [admit(store, j, "e", limit=3) for j in "de"] == ["parked"] * 2
    holders = store.redis.hgetall(store.k_holders)
    assert sorted(v.decode() for v in holders.values()) == ["a", "b", "c"]
    done = store.finish("b", execution_key="e", instance="w1")
    assert done.promotion is not None and done.promotion.job_id == "d", "FIFO"
    store.confirm_promoted("d")
    assert admit(store, "d", "e", limit=3) == "run", "it picks up b's slot"
    assert admit(store, "d", "e", limit=3) == "parked", "a second delivery waits its turn"
    assert store.parked_ids("e") == ["e", "d"]
    for job in "acd":
        store.finish(job, execution_key="e", instance="w1")
    # e and d's second copy were handed the slots of a and c; d's own slot is free
    assert sorted(v.decode() for v in store.redis.hgetall(store.k_holders).values()) == \
        ["d", "e"]
    assert store.parked_ids("e") == []


def test_a_second_delivery_of_a_slot_holder_is_never_handed_a_second_slot(store):
    """A job whose end was not recorded (Redis was down) is delivered again and parks
    behind its own slot: freed slots pass it over (it stays first) until its earlier
    attempt is finished; then it gets one slot. The chaos soak found the leak this was."""
    store.renew("w1", registered=False)
    assert [admit(store, j, "e", limit=3) for j in "axy"] == ["run"] * 3
    assert admit(store, "a", "e", limit=3) == "parked", "a runs still, as far as Redis knows"
    assert admit(store, "b", "e", limit=3) == "parked"
    done = store.finish("x", execution_key="e", instance="w1")
    assert done.promotion is not None and done.promotion.job_id == "b", "a is passed over"
    assert store.parked_ids("e") == ["a"], "a stays first in line"
    assert [v.decode() for v in store.redis.hgetall(store.k_holders).values()].count("a") == 1
    store.confirm_promoted("b")
    # The reconcile finishes a's earlier attempt: its slot goes to a itself.
    done = store.finish("a", execution_key="e", instance="w1")
    assert done.promotion is not None and done.promotion.job_id == "a"
    for job in "aby":
        store.finish(job, execution_key="e", instance="w1")
    assert store.redis.hlen(store.k_holders) == 0 and store.redis.hlen(store.k_slots) == 0


def test_a_second_delivery_never_takes_a_second_free_slot(store):
    """Copies of one job delivered at once (a broker stall, a publish retried): while one
    is recorded as running, the others wait, though the key has free slots."""
    store.renew("w1", registered=False)
    assert admit(store, "a", "e", limit=3) == "run"
    assert admit(store, "a", "e", limit=3) == "parked"
    assert admit(store, "a", "e", limit=3) == "parked"
    assert [v.decode() for v in store.redis.hgetall(store.k_holders).values()] == ["a"]
    assert admit(store, "b", "e", limit=3) == "parked", "no overtaking of the copies"
    done = store.finish("a", execution_key="e", instance="w1")
    assert done.promotion is not None and done.promotion.job_id == "a", "the next copy"


def test_an_orphaned_slot_is_released_exactly(store):
    """The orphan sweep names the very slot a lost job holds, whatever `slots` says."""
    store.renew("w1", registered=False)
    assert [admit(store, j, "e", limit=3) for j in "abc"] == ["run"] * 3
    slot = store.redis.hget(store.k_slots, "c").decode()
    store.redis.hdel(store.k_running, "c")  # c is nowhere now
    store.redis.hset(store.k_slots, "c", "e\x00#2")  # and its record names another slot
    assert store.orphan("e", "c", slot, release=True) == 3
    store.finish("c", execution_key="e")
    assert store.redis.hget(store.k_holders, slot) is None, "the orphaned slot is free"
    assert store.redis.hget(store.k_holders, "e\x00#2").decode() == "b"


def test_a_new_job_never_overtakes_a_parked_one(store):
    store.renew("w1", registered=False)
    assert admit(store, "a", "e") == "run"
    assert admit(store, "b", "e") == "parked"
    # b was published with limit 1; c with limit 2 finds a free slot but b is first.
    assert admit(store, "c", "e", limit=2) == "parked"
    assert store.parked_ids("e") == ["b", "c"]


def test_a_slot_above_a_lowered_live_limit_retires_when_its_job_ends(store):
    store.renew("w1", registered=False)
    assert [admit(store, j, "e", limit=3) for j in "abc"] == ["run"] * 3
    assert admit(store, "d", "e", limit=3) == "parked"
    store.redis.hset(store.k_limits, "e", 1)
    assert store.finish("c", execution_key="e", instance="w1").promotion is None
    assert store.finish("b", execution_key="e", instance="w1").promotion is None
    done = store.finish("a", execution_key="e", instance="w1")
    assert done.promotion is not None and done.promotion.job_id == "d"
    assert store.redis.hlen(store.k_holders) == 1


def test_an_operator_release_of_a_slot_name_finds_its_key(store):
    store.renew("w1", registered=False)
    assert [admit(store, j, "e", limit=2) for j in "ab"] == ["run"] * 2
    assert admit(store, "c", "e", limit=2) == "parked"
    slot = store.redis.hget(store.k_slots, "b").decode()
    assert slot == "e\x00#2"
    done = store.finish("b", execution_key=slot, instance="w1")
    assert done.promotion is not None and done.promotion.job_id == "c"


def test_a_raised_live_limit_starts_parked_jobs_at_once_and_a_clear_forgets_it(store):
    store.renew("w1", registered=False)
    assert admit(store, "a", "e") == "run"
    assert [admit(store, j, "e") for j in "bcd"] == ["parked"] * 3
    promoted = store.set_limit("e", 3)
    assert [p.job_id for p in promoted] == ["b", "c"], "two free slots, in line order"
    assert store.limits() == {"e": 3}
    for job in "bc":
        store.confirm_promoted(job)
        assert admit(store, job, "e") == "run"
    assert store.parked_ids("e") == ["d"]
    assert store.set_limit("e", None) == [] and store.limits() == {}


# -- a job's history (roger_history_ttl) --------------------------------------------------


def events_of(store: Store, job: str) -> list[tuple[str, str | None]]:
    return [(e["event"], e["detail"]) for e in store_reads.job_records(store, job).history]


def test_each_transition_writes_the_jobs_history(store):
    store.renew("w1", registered=False)
    assert store.take_queue_key("k", "a") is None and store.confirm_queue_key("k", "a")
    assert admit(store, "a", "e", qk="k") == "run"
    assert admit(store, "b", "e") == "parked"
    assert store.finish("a", execution_key="e", queue_key="k", instance="w1",
                        outcome="succeeded").promotion.job_id == "b"
    assert events_of(store, "a") == [("published", "queue key k"),
                                     ("admitted", "execution key e"), ("succeeded", None)]
    assert events_of(store, "b") == [
        ("parked", "behind execution key e at position 1, held by a"),
        ("promoted", "execution key e handed on by a")]
    record = store.redis.hget(store.k_running, "a")  # (gone: finished)
    assert record is None

    first = store.start("c", "q", {"job": "c", "instance": "w1", "queue": "q"}, "w1")
    assert first[0] == "run"
    written = store.redis.hget(store.k_running, "c").decode()
    store.start("d", "q", {"job": "d", "instance": "w1", "queue": "q"}, "w1",
                done={"done": "c", "done_record": written, "done_outcome": "failed"})
    assert events_of(store, "c") == [("started", "queue q"), ("failed", None)]

    assert store.schedule_retry("d", 5, entry("d"))
    store.bury("d", "q", {"id": "d", "task": "t", "error_type": "KeyError", "queue": "q"})
    store.unbury("d", "q")
    assert [e for e, _ in events_of(store, "d")] == ["started", "retry scheduled", "buried",
                                                      "requeued"]
    store.hold("h", "q", entry("h"))
    store.cancel("h")
    assert [e for e, _ in events_of(store, "h")] == ["held", "cancelled"]
    entries = store_reads.job_records(store, "a").history
    assert all(abs(e["at"] - time.time()) < 60 for e in entries)
    assert 0 < store.redis.pttl(store.history_key("a")) <= 86_400_000


def test_history_is_bounded_off_at_zero_and_never_breaks_a_script(store, redis_url):
    for _ in range(60):
        store.schedule_retry("j", 1, entry("j"))
    assert len(events_of(store, "j")) == 50, "the last 50 entries are kept"
    store.redis.set(store.history_key("x"), "not a list")  # garbage where history goes
    store.renew("w1", registered=False)
    assert admit(store, "x", "e2") == "run", "the transition happens, its entry is lost"
    assert store.redis.get(store.history_key("x")) == b"not a list"

    app = Celery("no-history", broker=redis_url, backend=redis_url)
    app.conf.update(roger_redis_url=redis_url, roger_partition=f"tr-{uuid.uuid4().hex[:8]}",
                    roger_history_ttl=0)
    quiet = Roger(app).store
    quiet.renew("w1", registered=False)
    assert admit(quiet, "y", "e") == "run"
    assert quiet.redis.exists(quiet.history_key("y")) == 0
    app.close()
