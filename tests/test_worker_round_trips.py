"""What a job costs its worker in Redis round trips, on real prefork workers (issue 14).

A job without keys releases nothing when it ends, so its pool process folds that end into
its next start check (celery_roger/deferred.py): one script call per job, not two. An
ended job must still not be left recorded as running: the process's flusher forgets it
when no job follows, and a process that exits forgets it first."""

from __future__ import annotations

from typing import Any

from celery_roger.runtime import runtime

from .conftest import events, wait_until

JOBS = 300


def script_calls(r: Any) -> int:
    return int(r.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))


def still_running(app: Any, r: Any, ids: set[str]) -> set[str]:
    recorded = {k.decode() for k in r.hkeys(runtime(app).store.k_running)}
    return recorded & ids


def test_a_job_without_keys_costs_its_pool_process_one_script_call(app_module, run, r,
                                                                   worker):
    w = worker(concurrency=2)
    before = script_calls(r)
    ids = {app_module.step.delay(run, f"j{i}").id for i in range(JOBS)}
    wait_until(lambda: len(events(r, run, "stop")) >= JOBS, timeout=60,
               what=f"{JOBS} jobs to run")
    spent = script_calls(r) - before
    # One start check per job; the worker's lease and tick add about two calls a second.
    # Without the fold a job cost two calls (start check, finish): 600 and more.
    assert JOBS <= spent < 1.3 * JOBS, f"{spent} script calls for {JOBS} jobs without keys"
    wait_until(lambda: not still_running(app_module.app, r, ids), timeout=5,
               what="the ended jobs to be forgotten as running (the flusher)")
    assert w.is_alive()


def test_a_pool_process_that_exits_forgets_its_last_job_as_running(app_module, run, r,
                                                                   worker):
    # --max-tasks-per-child=1: each process exits right after its job, before its
    # flusher's moment; the worker's own reconcile would take a lease period and more.
    worker(concurrency=2, extra_args=["--max-tasks-per-child", "1"])
    ids = {app_module.step.delay(run, f"j{i}").id for i in range(6)}
    wait_until(lambda: len(events(r, run, "stop")) >= 6, timeout=60, what="6 jobs to run")
    wait_until(lambda: not still_running(app_module.app, r, ids), timeout=3,
               what="the jobs of exited pool processes to be forgotten as running")
