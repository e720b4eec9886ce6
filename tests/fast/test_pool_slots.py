"""``lease.PoolSlots``: what a pool process runs, as its worker's main process sees it
(shared memory across fork; the lease kill skips a process that runs another job)."""

from __future__ import annotations

import os

from celery_roger.lease import PoolSlots


def in_child(slots: PoolSlots, action) -> int:
    """Run ``action`` in a forked child (as a pool process would); returns its pid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        try:
            action()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_a_job_started_in_a_child_is_seen_by_the_parent() -> None:
    slots = PoolSlots()
    pid = in_child(slots, lambda: slots.running(3, "job-a"))
    assert not slots.runs_other(pid, "job-a")
    assert slots.runs_other(pid, "job-b"), "the process runs job-a, not job-b"


def test_an_idle_or_unknown_process_is_not_taken_for_running_another_job() -> None:
    slots = PoolSlots()

    def ran_and_ended() -> None:
        slots.running(0, "job-a")
        slots.idle(0)

    pid = in_child(slots, ran_and_ended)
    assert not slots.runs_other(pid, "job-a")
    assert not slots.runs_other(pid + 100000, "job-a"), "an unknown pid runs nothing known"


def test_the_next_job_replaces_the_last_in_the_slot() -> None:
    slots = PoolSlots()

    def two_jobs() -> None:
        slots.running(1, "job-a")
        slots.idle(1)
        slots.running(1, "job-b")

    pid = in_child(slots, two_jobs)
    assert slots.runs_other(pid, "job-a")
    assert not slots.runs_other(pid, "job-b")


def test_long_ids_and_out_of_range_indexes() -> None:
    slots = PoolSlots()
    long_id = "x" * 500
    pid = in_child(slots, lambda: (slots.running(2, long_id), slots.running(9999, "job-z")))
    assert not slots.runs_other(pid, long_id), "a long id is compared by its stored prefix"
    assert slots.runs_other(pid, "job-z"), "an index past the slots writes nothing"
