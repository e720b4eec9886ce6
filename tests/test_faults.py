"""Faults and load with real processes: roger loses no job and never breaks a guarantee.

Each test injects a real fault (SIGKILL of a worker's process group, a Redis restart, a
Redis that is down) or a real load (publishers in several processes, several workers on
many keys), then checks from the recorded timeline that every accepted job ran, that no
two jobs of one execution key ever ran at once, and that no key stayed held. Each prints
its figures (the numbers in docs/reliability.md come from these lines).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import redis
from celery import Celery
from kombu.transport import redis as kombu_redis

from celery_roger import Roger
from celery_roger.testing import RedisServer

from .conftest import APPS, timeline, wait_until

BROKER = os.environ.get("ROGER_TEST_BROKER", "")
ON_REDIS_BROKER = not BROKER.startswith("amqp")

needs_visibility_knob = pytest.mark.skipif(
    ON_REDIS_BROKER and not hasattr(kombu_redis.Channel, "unacked_restore_interval"),
    reason="this kombu restores unacked messages only every ~100 s (not configurable)",
)


# -- what the timeline shows ---------------------------------------------------------------


def done_counts(r: redis.Redis, run: str) -> Counter[str]:
    return Counter(e["name"] for e in timeline(r, run) if e["event"] == "done")


def wait_all_done(r: redis.Redis, run: str, names: Iterable[str], *, timeout: float) -> None:
    wanted = set(names)

    def missing() -> set[str]:
        return wanted - set(done_counts(r, run))

    deadline = time.monotonic() + timeout
    while missing():
        if time.monotonic() > deadline:
            left = sorted(missing())
            pytest.fail(f"{len(left)} of {len(wanted)} jobs never finished: {left[:10]}")
        time.sleep(0.1)


def check_exclusive(entries: list[dict[str, Any]], key_of: Callable[[str], str | None]) -> int:
    """No two attempts of one execution key overlap; returns the most running at once.

    The timeline is one Redis list, so its order is the order in which the jobs' processes
    recorded their starts and stops. An attempt of a killed process ends at the
    ``killed`` entry the test records once those processes are gone.
    """
    holder: dict[str, tuple[str, int]] = {}
    running: set[tuple[str, int]] = set()
    most = 0
    for e in entries:
        if e["event"] == "killed":
            dead = set(e["pids"])
            holder = {k: h for k, h in holder.items() if h[1] not in dead}
            running = {a for a in running if a[1] not in dead}
            continue
        if e["event"] not in ("attempt", "done"):
            continue
        key = key_of(e["name"])
        if e["event"] == "attempt":
            running.add((e["name"], e["pid"]))
            most = max(most, len(running))
            if key is not None:
                assert key not in holder, (
                    f"{e['name']} started while {holder[key][0]} held execution key {key!r}")
                holder[key] = (e["name"], e["pid"])
        else:
            running.discard((e["name"], e["pid"]))
            if key is not None:
                assert holder.get(key, ("",))[0] == e["name"], (
                    f"{e['name']} ended but {holder.get(key)} held {key!r}")
                del holder[key]
    return most


def roger_state(url: str) -> Roger:
    """A Roger view of the test app's partition in the Redis at ``url``."""
    app = Celery("faults-view", broker=url, backend=url)
    app.conf.update(roger_redis_url=url, roger_partition="test")
    return Roger(app)


def held_keys(roger: Roger, run: str) -> dict[str, list[str]]:
    """Keys of this run still held, and jobs of this run still recorded anywhere."""
    store = roger.store
    found: dict[str, list[str]] = {}
    for kind, hash_key in (("queue", store.k_qkeys), ("execution", store.k_holders)):
        found[kind] = sorted(k.decode() for k in store.redis.hkeys(hash_key)
                             if k.decode().startswith(run))
    found["parked"] = sorted(k.decode() for k in store.redis.scan_iter(
        match=f"{store.prefix}parked:{run}*"))
    found["running"] = sorted(
        j for j, info in ((j.decode(), json.loads(v))
                          for j, v in store.redis.hgetall(store.k_running).items())
        if str(info.get("ek") or "").startswith(run) or str(info.get("qk") or "").startswith(run)
    )
    return found


def nothing_held(roger: Roger, run: str) -> bool:
    return not any(held_keys(roger, run).values())


def children(pid: int) -> set[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def figures(name: str, **values: Any) -> None:
    """One line of figures, shown with ``pytest -s`` and in the captured output."""
    print(f"\nFIGURES {name}: " + json.dumps(values, sort_keys=True))


def start_publishers(specs: list[dict[str, Any]], env: dict[str, str]) -> list[subprocess.Popen]:
    full_env = {**os.environ, **env,
                "PYTHONPATH": os.pathsep.join([str(APPS), os.environ.get("PYTHONPATH", "")])}
    return [subprocess.Popen([sys.executable, str(APPS / "load_publisher.py"), json.dumps(spec)],
                             cwd=str(APPS), env=full_env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
            for spec in specs]


def collect(procs: list[subprocess.Popen], *, timeout: float) -> list[dict[str, Any]]:
    lines = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, f"publisher failed ({proc.returncode}):\n{err[-3000:]}"
        lines += [json.loads(line) for line in out.splitlines() if line.strip()]
    return lines


# -- 1. SIGKILL of a whole worker mid-load ---------------------------------------------------


@needs_visibility_knob
def test_sigkill_of_a_whole_worker_mid_load_loses_nothing(app_module, run, r, worker,
                                                           redis_url):
    """Late ack: the killed worker's jobs come back; its keys are freed after its lease;
    every parked job runs; no key is left held."""
    env = {"ROGER_TEST_LEASE": "4", "ROGER_TEST_VISIBILITY": "4"}
    doomed = worker(env=env)
    worker(env=env)
    jobs, keys = 240, 24

    def key_of(name: str) -> str:
        return f"{run}:ek{int(name[1:]) % keys}"

    names = [f"j{i:03d}" for i in range(jobs)]
    for name in names:
        app_module.fragile.apply_async((run, name, "sleep", 0.1), queue_key=f"{run}:qk-{name}",
                                       execution_key=key_of(name))
    wait_until(lambda: sum(done_counts(r, run).values()) >= jobs // 4, timeout=60,
               what="a quarter of the jobs to finish")
    pids = children(doomed.pid) | {doomed.pid}
    os.killpg(doomed.pid, signal.SIGKILL)
    doomed.process.wait(10)
    wait_until(lambda: not any(os.path.exists(f"/proc/{p}") for p in pids), timeout=10,
               what="the killed worker's processes to be gone")
    entries = timeline(r, run)
    killed_running = {e["name"] for e in entries if e["event"] == "attempt"
                      and e["pid"] in pids} - {e["name"] for e in entries
                                               if e["event"] == "done" and e["pid"] in pids}
    r.rpush(f"timeline:{run}", json.dumps({"event": "killed", "pids": sorted(pids)}))
    worker(env=env)  # the replacement

    began = time.monotonic()
    wait_all_done(r, run, names, timeout=120)
    recovered_in = time.monotonic() - began
    most = check_exclusive(timeline(r, run), key_of)
    roger = Roger(app_module.app)
    wait_until(lambda: nothing_held(roger, run), timeout=15,
               what=f"no key of the run to be held: {held_keys(roger, run)}")
    counts = done_counts(r, run)
    duplicates = sorted(n for n, c in counts.items() if c > 1)
    crash_reports = [e for e in timeline(r, run)
                     if e["event"] == "cb" and e["cb"] == "on_error"]
    figures("sigkill", jobs=jobs, execution_keys=keys, workers=3, killed_process_group=1,
            running_when_killed=len(killed_running), lost=len(set(names) - set(counts)),
            duplicate_runs=len(duplicates), keys_stuck=0, crash_reports=len(crash_reports),
            most_running_at_once=most, all_done_after_kill_s=round(recovered_in, 1))
    # A job can run twice only if it had finished when its worker died before acking it.
    assert set(duplicates) <= {e["name"] for e in entries if e["event"] == "done"
                               and e["pid"] in pids}, duplicates
    # One on_error(WorkerCrashed) per job the dead worker had admitted: running, or
    # reserved to run next (at most concurrency x prefetch multiplier = 8 here).
    reported = Counter(e["job"] for e in crash_reports)
    assert all(c == 1 for c in reported.values()), reported
    assert len(killed_running) <= len(reported) <= 8


# -- 2. Redis restarted under load ------------------------------------------------------------


@pytest.mark.redis_broker("its broker is the Redis it restarts, whatever the run's broker")
def test_redis_restart_under_load(app_module, run, r, worker, redis_url):
    """Broker and roger state in one Redis (appendonly) that restarts mid-load: publishes
    during the outage fail with a clear error and leave no key taken; every accepted job
    runs; the workers carry on without a restart."""
    with RedisServer(appendonly=True) as state:
        # A message popped by a worker in the instant Redis went down is lost in flight
        # (kombu's Redis transport), as is a write of the last second before the restart
        # (appendfsync everysec): the orphaned-key sweep frees such a key, here within 6 s.
        env = {"ROGER_TEST_BROKER": state.url, "ROGER_TEST_STATE_URL": state.url,
               "ROGER_TEST_VISIBILITY": "6", "ROGER_TEST_GRACE": "3", "ROGER_TEST_LEASE": "10",
               "ROGER_TEST_SETTINGS": json.dumps({"roger_orphaned_key_seconds": 6})}
        workers = [worker(env=env), worker(env=env)]
        keys, jobs, pace = 10, 300, 0.02
        start_at = time.time() + 1.0
        spec = {"run": run, "task": "fragile", "how": "sleep", "duration": 0.02,
                "jobs": [{"name": f"j{i:03d}", "qk": f"{run}:qk-{i:03d}",
                          "ek": f"{run}:ek{i % keys}", "at": start_at + i * pace}
                         for i in range(jobs)]}
        (publisher,) = start_publishers(
            [spec], {"ROGER_TEST_REDIS_URL": redis_url, "ROGER_TEST_BROKER": state.url,
                     "ROGER_TEST_STATE_URL": state.url, "ROGER_TEST_QUEUE": f"q-{run}",
                     "ROGER_TEST_GRACE": "3"})
        time.sleep(max(0.0, start_at + 2.0 - time.time()))
        state.stop()
        outage_began = time.time()
        time.sleep(2.0)
        state.start()
        outage = time.time() - outage_began
        lines = collect([publisher], timeout=120)

        accepted = {line["name"] for line in lines if "ok" in line}
        failed = [line for line in lines if "error" in line]
        assert len(lines) == jobs and accepted and failed, (len(lines), len(failed))
        for line in failed:  # a clear error: the connection to Redis, named
            assert ("ConnectionError" in line["error"] or "OperationalError" in line["error"]), \
                line
            assert str(state.port) in line["error"] or "onnection" in line["error"], line

        wait_all_done(r, run, accepted, timeout=120)
        roger = roger_state(state.url)
        # A key taken just before the outage by a publish that then failed frees itself
        # after the grace period (3 s here), a key of a job lost in flight after the
        # sweep's bound (6 s, two sightings); the others were released at once.
        wait_until(lambda: nothing_held(roger, run), timeout=40,
                   what=f"no key of the run to be held: {held_keys(roger, run)}")
        ran = {name for name in done_counts(r, run)}
        assert not ran - accepted - {line["name"] for line in failed}
        assert all(w.is_alive() for w in workers), "a worker died with Redis"

        # The same workers serve new jobs at once.
        (late,) = start_publishers(
            [{"run": run, "task": "fragile", "jobs": [{"name": "late", "qk": f"{run}:late",
                                                        "ek": f"{run}:ek0"}]}],
            {"ROGER_TEST_REDIS_URL": redis_url, "ROGER_TEST_BROKER": state.url,
             "ROGER_TEST_STATE_URL": state.url, "ROGER_TEST_QUEUE": f"q-{run}"})
        assert "ok" in collect([late], timeout=30)[0]
        wait_all_done(r, run, ["late"], timeout=30)
        most = check_exclusive(timeline(r, run), lambda name: None if name == "late"
                               else f"ek{int(name[1:]) % keys}")
        counts = done_counts(r, run)
        duplicates = sorted(n for n, c in counts.items() if c > 1)
        failed_with_run = sorted({line["name"] for line in failed} & ran)
        figures("redis-restart", jobs=jobs, accepted=len(accepted), refused_in_outage=len(failed),
                outage_s=round(outage, 1), workers=2, lost=len(accepted - ran),
                duplicate_runs=len(duplicates), failed_but_ran=len(failed_with_run),
                keys_stuck=0, most_running_at_once=most)
        assert not failed_with_run, f"publishes reported failed but ran: {failed_with_run}"


# -- 3. Redis down at worker start and during admission ---------------------------------------


def test_redis_down_at_start_and_during_admission_neither_runs_nor_drops(app_module, run, r,
                                                                         worker):
    """Roger's own Redis is down: the worker starts, the jobs wait (unacked or requeued),
    none runs and none is dropped or taken for cancelled; once Redis is back each runs
    once."""
    state = RedisServer()  # not started yet
    try:
        w = worker(env={"ROGER_TEST_STATE_URL": state.url}, concurrency=2)
        rounds = []
        for phase in ("at-start", "during-admission"):
            names = [f"{phase}-{i}" for i in range(6)]
            for i, name in enumerate(names):
                app_module.fragile.apply_async(
                    (run, name), execution_key=f"{run}:ek" if i % 2 else None)
            time.sleep(3.0)  # a window in which nothing may run (checked just below)
            assert not [e for e in timeline(r, run) if e["event"] == "attempt"
                        and e["name"] in names], "a job ran while Redis was down"
            state.start()
            began = time.monotonic()
            wait_all_done(r, run, names, timeout=60)
            rounds.append(round(time.monotonic() - began, 1))
            if phase == "at-start":
                state.stop()
        assert w.is_alive()
        counts = done_counts(r, run)
        assert all(c == 1 for c in counts.values()), counts
        cancels = [e for e in timeline(r, run) if e["event"] == "cb" and e["cb"] == "on_cancel"]
        assert not cancels, "a job was taken for cancelled because Redis was down"
        figures("redis-down", jobs=12, lost=0, duplicate_runs=0, cancelled=0,
                ran_after_redis_back_s=rounds)
    finally:
        state.stop()


# -- 4. many publishers, many keys, several workers ----------------------------------------------


def test_many_publishers_in_several_processes_one_accepted_per_key(app_module, run, r, worker,
                                                                    redis_url):
    processes, rounds, keys = 4, 10, 5
    start_at = time.time() + 2.0
    specs = [{"run": run, "task": "fragile",
              "jobs": [{"name": f"r{rd}k{k}p{p}", "qk": f"{run}:r{rd}:k{k}",
                        "at": start_at + rd * 0.2} for rd in range(rounds) for k in range(keys)]}
             for p in range(processes)]
    lines = collect(start_publishers(specs, {"ROGER_TEST_REDIS_URL": redis_url,
                                             "ROGER_TEST_QUEUE": f"q-{run}"}), timeout=60)
    assert not [line for line in lines if "error" in line]
    by_key: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        by_key.setdefault(line["qk"], []).append(line)
    assert len(by_key) == rounds * keys
    for key, tries in by_key.items():
        winners = [t for t in tries if "ok" in t]
        assert len(winners) == 1, f"{key}: {len(winners)} publishes accepted"
        assert {t["duplicate"] for t in tries if "duplicate" in t} == {winners[0]["ok"]}
    accepted = {t["name"] for t in lines if "ok" in t}
    worker(concurrency=4)
    wait_all_done(r, run, accepted, timeout=60)
    counts = done_counts(r, run)
    assert set(counts) == accepted and all(c == 1 for c in counts.values())
    figures("many-publishers", processes=processes, rounds=rounds, keys_per_round=keys,
            publishes=len(lines), accepted=len(accepted), accepted_per_key=1)


def test_many_keys_under_load_with_several_workers(app_module, run, r, worker):
    """Three workers (prefork, threads, prefork) on one queue, 40 execution keys: never two
    holders of a key, every job finished once, no key left held."""
    worker(concurrency=2)
    worker(pool="threads", concurrency=4)
    worker(concurrency=2)
    jobs, keys = 400, 40

    def key_of(name: str) -> str:
        return f"{run}:ek{int(name[1:]) % keys}"

    names = [f"j{i:03d}" for i in range(jobs)]
    for name in names:
        app_module.fragile.apply_async((run, name, "sleep", 0.01), execution_key=key_of(name))
    wait_all_done(r, run, names, timeout=120)
    most = check_exclusive(timeline(r, run), key_of)
    counts = done_counts(r, run)
    assert all(c == 1 for c in counts.values()), {n: c for n, c in counts.items() if c > 1}
    roger = Roger(app_module.app)
    wait_until(lambda: nothing_held(roger, run), timeout=10,
               what=f"no key of the run to be held: {held_keys(roger, run)}")
    parked = [e for e in timeline(r, run) if e["event"] == "cb" and e["cb"] == "before_run"]
    figures("many-keys", jobs=jobs, execution_keys=keys, workers=3, lost=0, duplicate_runs=0,
            two_holders=0, most_running_at_once=most, keys_stuck=0, started=len(parked))
    assert most >= 4, "the load never ran jobs in parallel"
