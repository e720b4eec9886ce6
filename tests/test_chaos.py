"""The chaos soak: real workers under randomly injected faults, then an invariant checker.

Three private Redis servers (the broker; roger's state and Celery's results, with
``appendonly yes``; the run's timeline, never faulted), three prefork workers
(``-c 2``, lease 4 s, visibility timeout 8 s) of ``tests/apps/chaos_app.py``, and a
publisher thread in this process that publishes a few thousand short jobs over 30
execution keys and many queue keys (unique ones, and a few hot ones published again and
again, so ``DuplicateJob`` refusals happen), with retryable failures, failures for good,
jobs that get buried, and cancellations. Meanwhile a fault thread injects, at seeded
random times: SIGKILL of a worker's process group (and a replacement), SIGSTOP/SIGCONT of
a worker's group (shorter and longer than the lease), a broker stall (SIGSTOP of the
broker's redis-server), a restart of roger's Redis, and poisoned keys; some jobs' callbacks
are slow (longer than the lease) or raise (``RuntimeError``, ``SystemExit``).

Then it drains (bounded) and checks, from the timeline, Celery's result states and roger's
keys:

1. never two holders of one execution key at once. Every attempt records its start and its
   end; one that never recorded its end ends at the first known bound: the soak's SIGKILL
   of its worker, a kill of its pool process recorded by its worker (Celery's terminate,
   roger's lease loss), its process's death seen through a pidfd (roger's own guards kill
   from inside), or its process's next attempt. The time a process spent SIGSTOPped is not
   running time. Reported apart, not failing: ``after-freeze`` (an attempt frozen longer
   than the lease went on for a moment after SIGCONT beside the job that took its key: no
   lease can prevent that) and ``uncertain`` (within the few ms a pidfd bound allows);
2. every accepted job ended: succeeded, buried, failed for good, or was cancelled, as its
   plan allows (REVOKED only for a job the soak cancelled; a retryable job fails early only
   after a crash). A job that ran to completion twice is a duplicate, counted with its
   cause, and must be explained by a fault (a kill or stop of its worker, a stall, a
   restart, a poison). Counted apart, not failing: jobs that ended (the timeline shows it)
   while the results' Redis restarted, so that Celery could not store their outcome, and
   jobs lost in flight by kombu's Redis transport (published the moment a worker was
   SIGKILLed, never received by any worker: issue 12 #5);
3. no key held after the drain: ``held`` and ``qkeys`` empty;
4. nothing left in ``msg``, ``running``, ``parked:*``;

and also that no refused duplicate ran, no job started after its cancel returned, and no
worker stopped on its own or failed to start (one that stops is replaced, as a supervisor
would, so that the run goes on). It prints one ``FIGURES chaos:`` line and writes every
detail (overlaps, lost jobs with their log lines, leftovers, faults) to
``chaos-report.json`` next to the workers' logs.

Environment:

* ``ROGER_CHAOS_SEED``: the seed (default random); printed first, and in every failure.
  The plan (jobs, their behaviour, the faults and their times) is a function of the seed,
  the duration and the fault kinds; the machine's timing is not, so a replay repeats the
  plan, not every interleaving.
* ``ROGER_CHAOS_SECONDS``: length of the publishing and fault phase (default 75); the
  number of jobs and of faults grows with it.
* ``ROGER_CHAOS_FAULTS``: the fault kinds, comma-separated, from
  ``kill,stop,broker,restart,callbacks,poison`` (default all; ``none`` for a clean run).
* ``ROGER_CHAOS_POISONS``: the poisons, from ``cancel_reports,paused,parked,running``
  (default: drawn from all by the seed).
* ``ROGER_CHAOS_CALLBACKS``: how callbacks misbehave (with ``callbacks``), from
  ``slow,raise,exit`` (default all).

Run: ``.venv/bin/pytest -m chaos tests/test_chaos.py -s`` (``-s`` shows the progress).
"""

from __future__ import annotations

import contextlib
import heapq
import importlib
import itertools
import json
import os
import random
import re
import select
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from celery_roger.testing import RedisServer, WorkerProcess

APPS = Path(__file__).parent / "apps"

ALL_FAULTS = ("kill", "stop", "broker", "restart", "callbacks", "poison")
ALL_POISONS = ("cancel_reports", "paused", "parked", "running")
ALL_CALLBACKS = ("slow", "raise", "exit")
#: What redis-py raises while a Redis is down or still loading its data after a restart.
REDIS_DOWN_ERRORS = ("ConnectionError", "TimeoutError", "BusyLoadingError")
LEASE = 4.0
VISIBILITY = 8.0
WORKERS = 3
RATE = 34.0  # jobs published per second
EXECUTION_KEYS = 30
#: Every LIMITED_EVERY-th execution key (ek-00, the hottest, among them) has
#: execution_limit LIMIT: never more than LIMIT of its jobs may run at once.
LIMITED_EVERY = 5
LIMIT = 3
HOT_QUEUE_KEYS = 8
RETRY_LEVELS = (0.3, 0.6)  # chaos_app.RETRY_LEVELS
APPROXIMATE_ENDS = {"death-seen": 0.02, "worker-exit": 0.25, "death-unseen": float("inf")}
CRASH_ERRORS = {"WorkerCrashed", "WorkerLostError", "JobTimeout", "Terminated"}
FINAL = {"SUCCESS", "FAILURE", "REVOKED"}
#: A freeze at least this long lets other workers take the frozen worker's keys (its lease
#: was last renewed up to a second before the freeze).
TAKEOVER_FREEZE = LEASE - 1.0


def _seed() -> int:
    raw = os.environ.get("ROGER_CHAOS_SEED", "").strip()
    return int(raw, 0) if raw else random.SystemRandom().randrange(1, 2**31)


def _kinds(name: str, allowed: tuple[str, ...], default: tuple[str, ...]) -> tuple[str, ...]:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    if raw.strip().lower() == "none":
        return ()
    kinds = tuple(k.strip() for k in raw.split(",") if k.strip())
    unknown = sorted(set(kinds) - set(allowed))
    if unknown:
        raise ValueError(f"{name}: unknown {unknown}; choose from {','.join(allowed)}")
    return kinds


SEED = _seed()
SECONDS = float(os.environ.get("ROGER_CHAOS_SECONDS") or 75)
FAULTS = _kinds("ROGER_CHAOS_FAULTS", ALL_FAULTS, ALL_FAULTS)
POISONS = _kinds("ROGER_CHAOS_POISONS", ALL_POISONS, ALL_POISONS)
CALLBACKS = _kinds("ROGER_CHAOS_CALLBACKS", ALL_CALLBACKS, ALL_CALLBACKS)
DRAIN_SECONDS = max(60.0, SECONDS * 0.6)
SETTLE_SECONDS = LEASE + VISIBILITY + 10

pytestmark = [
    pytest.mark.chaos,
    pytest.mark.redis_broker("the soak SIGSTOPs its Redis broker"),
    pytest.mark.timeout(int(SECONDS + DRAIN_SECONDS + SETTLE_SECONDS + 150)),
]


def replay_hint() -> str:
    faults = ",".join(FAULTS) or "none"
    return (f"seed={SEED}; replay: ROGER_CHAOS_SEED={SEED} ROGER_CHAOS_SECONDS={SECONDS:g} "
            f"ROGER_CHAOS_FAULTS={faults} ROGER_CHAOS_POISONS={','.join(POISONS) or 'none'} "
            f"ROGER_CHAOS_CALLBACKS={','.join(CALLBACKS) or 'none'} "
            f".venv/bin/pytest -m chaos tests/test_chaos.py -s")


# -- the plan: a pure function of the seed, the duration and the fault kinds -----------------


@dataclass
class JobPlan:
    i: int
    id: str
    at: float  # seconds after the start of the phase
    task: str  # "work" (not retryable) or "flaky" (retryable)
    ek: str | None
    qk: str | None
    d: float
    fail: int  # attempts that fail: 0, n, -1 = all
    cb: dict[str, str] = field(default_factory=dict)
    cancel_after: float | None = None

    def spec(self) -> dict[str, Any]:
        return {"name": f"j{self.i}", "ek": self.ek, "d": self.d, "fail": self.fail,
                "cb": self.cb}

    @property
    def natural(self) -> str:
        """The outcome the job's own behaviour leads to."""
        if self.fail == 0:
            return "success"
        if self.task == "flaky":
            return "success" if 0 < self.fail <= len(RETRY_LEVELS) else "buried"
        return "failed"


@dataclass
class FaultPlan:
    at: float
    kind: str
    duration: float = 0.0
    poison: str = ""


@dataclass
class Plan:
    jobs: list[JobPlan]
    faults: list[FaultPlan]


def key_limit(ek: str) -> int:
    """The execution_limit the soak publishes key ``ek`` ("ek-NN") with."""
    return LIMIT if int(ek.rsplit("-", 1)[1]) % LIMITED_EVERY == 0 else 1


def make_plan(seed: int, seconds: float, faults: tuple[str, ...], poisons: tuple[str, ...],
              callbacks: tuple[str, ...] = ALL_CALLBACKS) -> Plan:
    rng = random.Random(seed)
    n_jobs = int(seconds * RATE)
    span = max(5.0, seconds - 6.0)
    times = sorted(rng.uniform(0.0, span) for _ in range(n_jobs))
    weights = [1.0 / (k + 1) ** 0.7 for k in range(EXECUTION_KEYS)]
    jobs = []
    for i, at in enumerate(times):
        ek = None if rng.random() < 0.1 else \
            f"ek-{rng.choices(range(EXECUTION_KEYS), weights)[0]:02d}"
        r = rng.random()
        qk = f"u-{i}" if r < 0.45 else f"hot-{rng.randrange(HOT_QUEUE_KEYS)}" if r < 0.6 else None
        d = rng.uniform(0.3, 1.5) if rng.random() < 0.05 else rng.uniform(0.001, 0.020)
        if rng.random() < 0.15:
            task, fail = "flaky", rng.choices([0, 1, 2, -1], [30, 40, 15, 15])[0]
        else:
            task, fail = "work", (-1 if rng.random() < 0.03 else 0)
        job = JobPlan(i, f"c{seed}-{i:05d}", at, task, ek, qk, d, fail)
        if rng.random() < 0.03 and at < span - 1:
            job.cancel_after = rng.uniform(0.0, 0.6)
            if rng.random() < 0.5:
                job.d = rng.uniform(0.5, 1.5)  # likely running when the cancel comes
        jobs.append(job)
    if "callbacks" in faults:
        plan_callbacks(rng, jobs, seconds, callbacks)
    return Plan(jobs, plan_faults(rng, seconds, faults, poisons))


def plan_callbacks(rng: random.Random, jobs: list[JobPlan], seconds: float,
                   kinds: tuple[str, ...]) -> None:
    """Slow (longer than the lease) and raising callbacks, on a few jobs each."""
    per = max(1, round(seconds / 40))
    cancelled = [j for j in jobs if j.cancel_after is not None]
    failing = [j for j in jobs if j.fail != 0]
    buried = [j for j in jobs if j.natural == "buried"]
    fine = [j for j in jobs if j.fail == 0 and j.cancel_after is None]
    for pool, name, hows in ((cancelled, "on_cancel", ["slow"] * per + ["exit"] * per),
                             (failing, "on_error", ["slow"] * per + ["exit"] * per),
                             (buried, "on_buried", ["exit"] * per),
                             (fine, "after_run", ["exit"] * per)):
        chosen = rng.sample(pool, min(len(pool), len(hows)))
        for job, how in zip(chosen, hows, strict=False):
            if how in kinds:
                job.cb[name] = how
                if name == "on_cancel":  # running, or waiting, when its cancel comes
                    job.d, job.cancel_after = rng.uniform(1.0, 1.5), rng.uniform(0.05, 0.3)
    for pool, name, share in ((cancelled, "on_cancel", 0.3), (failing, "on_error", 0.2),
                              (buried, "on_buried", 0.3), (fine, "after_run", 0.01)):
        for job in pool:
            if rng.random() < share and name not in job.cb and "raise" in kinds:
                job.cb[name] = "raise"


def plan_faults(rng: random.Random, seconds: float, faults: tuple[str, ...],
                poisons: tuple[str, ...]) -> list[FaultPlan]:
    per = max(1, round(seconds / 40))
    planned: list[FaultPlan] = []
    poison_kinds = list(poisons)
    rng.shuffle(poison_kinds)
    for k in range(per):
        if "kill" in faults:
            planned.append(FaultPlan(0, "kill", 3.0))  # the replacement's start
        if "stop" in faults:  # alternately shorter and longer than the lease
            planned.append(FaultPlan(0, "stop", rng.uniform(0.8, 2.5) if k % 2 == 0
                                     else rng.uniform(LEASE + 1.5, VISIBILITY + 2.0)))
        if "broker" in faults:
            planned.append(FaultPlan(0, "broker", rng.uniform(LEASE + 1.0, LEASE + 3.0)
                                     if k % 2 == 0 else rng.uniform(1.0, 2.5)))
        if "restart" in faults:
            planned.append(FaultPlan(0, "restart", rng.uniform(0.3, 3.0)))
        if "poison" in faults and poison_kinds:
            planned.append(FaultPlan(0, "poison", 0.0, poison_kinds[k % len(poison_kinds)]))
    rng.shuffle(planned)
    window = max(0.0, seconds - 14.0)  # faults from 4 s in, the last one ends 10 s early
    while planned and sum(f.duration + 1.0 for f in planned) > window:
        planned.pop()
    slack = window - sum(f.duration + 1.0 for f in planned)
    cuts = sorted(rng.uniform(0, slack) for _ in planned)
    t, previous_cut = 4.0, 0.0
    for f, cut in zip(planned, cuts, strict=True):
        t += cut - previous_cut
        previous_cut = cut
        f.at = t
        t += f.duration + 1.0
    return planned


# -- the run ---------------------------------------------------------------------------------


class Worker:
    def __init__(self, process: WorkerProcess) -> None:
        self.process = process
        self.name = process.nodename
        self.killed = False  # by the soak
        self.exit_seen: float | None = None

    @property
    def pgid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.is_alive()


class Soak:
    def __init__(self, plan: Plan, log_dir: Path) -> None:
        self.plan = plan
        self.log_dir = log_dir
        self.rng = random.Random(SEED + 1)  # runtime choices (which worker)
        self.lock = threading.Lock()
        self.workers: list[Worker] = []
        self.faults: list[dict[str, Any]] = []
        self.published: dict[str, dict[str, Any]] = {}
        self.cancels: dict[str, dict[str, Any]] = {}
        self.start_failures: list[dict[str, Any]] = []
        self.harness_errors: list[str] = []
        self.worker_count = 0
        self.replacements = 0  # of workers that exited on their own
        self.deaths = DeathWatch(self)
        self.t0 = 0.0
        self.broker = RedisServer()
        self.state = RedisServer(appendonly=True)
        self.timeline_server = RedisServer()
        self.app_module: Any = None
        self.saved_env: dict[str, str | None] = {}

    # -- setup and teardown

    def env(self) -> dict[str, str]:
        return {"ROGER_CHAOS_BROKER": self.broker.url, "ROGER_CHAOS_STATE": self.state.url,
                "ROGER_CHAOS_TIMELINE": self.timeline_server.url,
                "ROGER_CHAOS_LEASE": str(LEASE), "ROGER_CHAOS_VISIBILITY": str(VISIBILITY)}

    def start_servers(self) -> None:
        for server in (self.broker, self.state, self.timeline_server):
            server.start()
        self.saved_env = {k: os.environ.get(k) for k in self.env()}
        os.environ.update(self.env())  # read by chaos_app when this process imports it
        if str(APPS) not in sys.path:
            sys.path.insert(0, str(APPS))
        if "chaos_app" in sys.modules:
            self.app_module = importlib.reload(sys.modules["chaos_app"])
        else:
            self.app_module = importlib.import_module("chaos_app")

    def new_worker(self) -> Worker:
        with self.lock:
            self.worker_count += 1
            n = self.worker_count
        env = {**self.env(), "ROGER_CHAOS_IN_WORKER": "1",
               "PYTHONPATH": os.pathsep.join([str(APPS), os.environ.get("PYTHONPATH", "")])}
        process = WorkerProcess("chaos_app", concurrency=2, queues=["chaos"],
                                name=f"chaos{n}@%h", env=env, cwd=str(APPS),
                                log_dir=str(self.log_dir))
        worker = Worker(process)
        with self.lock:
            self.workers.append(worker)
        try:
            process.start(timeout=45)
        except (RuntimeError, TimeoutError) as exc:
            worker.killed = True  # not one of the soak's workers any more
            with contextlib.suppress(Exception):
                process.stop(timeout=1)
            self.start_failures.append({"worker": worker.name, "t": time.time(),
                                        "error": str(exc).splitlines()[0],
                                        "log": str(process.log_path)})
            log(f"worker {worker.name} failed to start: {str(exc).splitlines()[0]}")
        return worker

    def start_workers(self) -> None:
        threads = [threading.Thread(target=self.new_worker) for _ in range(WORKERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if not any(w.alive() for w in self.workers):
            pytest.fail(f"[chaos {replay_hint()}] no worker started: "
                        f"{self.start_failures}")

    def teardown(self) -> None:
        if self.deaths.is_alive():
            self.deaths.stop()
        for server in (self.broker,):
            if server.process is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(server.process.pid, signal.SIGCONT)
        for w in self.workers:
            if w.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(w.pgid, signal.SIGCONT)
                w.process.kill(signal.SIGTERM)
        deadline = time.monotonic() + 8
        for w in self.workers:
            if w.process.process is not None:
                with contextlib.suppress(Exception):
                    w.process.process.wait(max(0.1, deadline - time.monotonic()))
                w.process.stop(timeout=0.1)
        if self.app_module is not None:
            with contextlib.suppress(Exception):
                self.app_module.app.close()
        for server in (self.broker, self.state, self.timeline_server):
            with contextlib.suppress(Exception):
                server.__exit__(None, None, None)
        for k, v in self.saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    # -- the publisher

    def publish_all(self) -> None:
        from celery_roger import DuplicateJob, Roger

        mod = self.app_module
        roger = Roger(mod.app)
        tasks = {"work": mod.work, "flaky": mod.flaky}
        heap: list[tuple[float, int, str, JobPlan, int]] = [
            (j.at, j.i, "publish", j, 0) for j in self.plan.jobs]
        heapq.heapify(heap)
        while heap:
            at, _, action, job, tries = heapq.heappop(heap)
            delay = self.t0 + at - time.time()
            if delay > 0:
                time.sleep(delay)
            if action == "publish":
                began = time.time()
                outcome: dict[str, Any] = {"t": began}
                try:
                    tasks[job.task].apply_async((job.spec(),), task_id=job.id,
                                                queue_key=job.qk, execution_key=job.ek,
                                                execution_limit=key_limit(job.ek)
                                                if job.ek else None)
                    outcome["ok"] = True
                except DuplicateJob as exc:
                    outcome["duplicate"] = exc.existing_id
                except Exception as exc:
                    outcome["error"] = f"{type(exc).__name__}: {exc}"
                outcome["took"] = time.time() - began
                self.published[job.id] = outcome
                if outcome.get("ok") and job.cancel_after is not None:
                    heapq.heappush(heap, (time.time() - self.t0 + job.cancel_after, job.i,
                                          "cancel", job, 1))
                continue
            record = self.cancels.setdefault(job.id, {"errors": []})
            t_before = time.time()
            try:
                where = roger.cancel(job.id)
            except Exception as exc:
                record["errors"].append(f"{type(exc).__name__}: {exc}")
                if tries < 4:
                    heapq.heappush(heap, (time.time() - self.t0 + 1.5, job.i, "cancel", job,
                                          tries + 1))
                continue
            record.update(t0=t_before, t1=time.time(), where=where)

    # -- the faults

    def alive_workers(self) -> list[Worker]:
        with self.lock:
            return [w for w in self.workers if w.alive() and not w.killed]

    def inject_all(self) -> None:
        for planned in self.plan.faults:
            delay = self.t0 + planned.at - time.time()
            if delay > 0:
                time.sleep(delay)
            try:
                getattr(self, f"fault_{planned.kind}")(planned)
            except Exception:
                self.harness_errors.append(f"fault {planned.kind}: {traceback.format_exc()}")
                log(f"fault {planned.kind} failed: {traceback.format_exc()}")

    def add_fault(self, fault: dict[str, Any]) -> None:
        fault["at"] = round(fault["t0"] - self.t0, 2)
        with self.lock:
            self.faults.append(fault)
        log(f"fault {fault['kind']} at +{fault['at']}s: "
            + json.dumps({k: v for k, v in fault.items()
                          if k not in ("kind", "at", "t0", "t1", "t2", "t3")}))

    def busy(self) -> Counter[int]:
        """Per worker (process group): attempts with an execution key running now."""
        client = redis.Redis.from_url(self.timeline_server.url)
        try:
            entries = [json.loads(e) for e in client.lrange("chaos:timeline", -600, -1)]
        finally:
            client.close()
        running: dict[str, dict[str, Any]] = {}
        for e in entries:
            if e["e"] == "start":
                running[e["a"]] = e
            elif e["e"] == "end":
                running.pop(e["a"], None)
        now = time.time()
        return Counter(e["pgid"] for e in running.values() if e.get("ek") and now - e["t"] < 3)

    def pick_worker(self) -> tuple[Worker | None, int]:
        """A live worker, preferably one running keyed jobs now (waits up to 3 s for one),
        so that a kill or a stop hits running jobs; the choice among them is seeded."""
        deadline = time.monotonic() + 3
        while True:
            candidates = self.alive_workers()
            if not candidates:
                return None, 0
            busy = self.busy()
            hit = [w for w in candidates if busy[w.pgid]]
            if hit or time.monotonic() > deadline:
                w = self.rng.choice(sorted(hit or candidates, key=lambda w: w.name))
                return w, busy[w.pgid]
            time.sleep(0.05)

    def fault_kill(self, planned: FaultPlan) -> None:
        w, running = self.pick_worker()
        if w is None:
            return
        w.killed = True
        t0 = time.time()
        os.killpg(w.pgid, signal.SIGKILL)
        t1 = time.time()
        with contextlib.suppress(Exception):
            w.process.process.wait(10)
        self.add_fault({"kind": "kill", "t0": t0, "t1": t1, "pgid": w.pgid, "worker": w.name,
                        "running_keyed": running})
        self.new_worker()

    def fault_stop(self, planned: FaultPlan) -> None:
        w, running = self.pick_worker()
        if w is None:
            return
        t0 = time.time()
        os.killpg(w.pgid, signal.SIGSTOP)
        t1 = time.time()
        try:
            time.sleep(planned.duration)
        finally:
            t2 = time.time()
            os.killpg(w.pgid, signal.SIGCONT)
        self.add_fault({"kind": "stop", "t0": t0, "t1": t1, "t2": t2, "pgid": w.pgid,
                        "worker": w.name, "seconds": round(t2 - t1, 2), "running_keyed": running,
                        "longer_than_lease": t2 - t1 > LEASE})

    def fault_broker(self, planned: FaultPlan) -> None:
        pid = self.broker.process.pid
        t0 = time.time()
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(planned.duration)
        finally:
            t1 = time.time()
            os.kill(pid, signal.SIGCONT)
        self.add_fault({"kind": "broker", "t0": t0, "t1": t1, "seconds": round(t1 - t0, 2),
                        "longer_than_lease": t1 - t0 > LEASE})

    def fault_restart(self, planned: FaultPlan) -> None:
        t0 = time.time()
        self.state.stop()  # SIGTERM: Redis writes its append-only file and exits
        time.sleep(planned.duration)
        for attempt in range(3):
            try:
                self.state.start()
                break
            except RuntimeError:
                if attempt == 2:
                    raise
                time.sleep(0.5)
        t1 = time.time()
        self.add_fault({"kind": "restart", "t0": t0, "t1": t1, "down_s": round(t1 - t0, 2)})

    def fault_poison(self, planned: FaultPlan) -> None:
        client = redis.Redis.from_url(self.state.url, socket_timeout=5)
        prefix = f"roger:{{{self.app_module.PARTITION}}}:"
        t0 = time.time()
        detail: dict[str, Any] = {"poison": planned.poison}
        if planned.poison == "cancel_reports":
            # Only while the list is empty: overwriting real reports would lose them.
            set_if_absent = client.register_script(
                "if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end "
                "redis.call('SET', KEYS[1], ARGV[1]) return 1")
            deadline = time.monotonic() + 5
            while not set_if_absent(keys=[prefix + "cancel_reports"], args=["garbage"]):
                if time.monotonic() > deadline:
                    detail["skipped"] = "cancel_reports never empty"
                    break
                time.sleep(0.02)
            detail["key"] = prefix + "cancel_reports"
        elif planned.poison == "paused":
            client.hset(prefix + "paused", "chaos-unused-queue", "{not json")
            detail["key"] = prefix + "paused#chaos-unused-queue"
        elif planned.poison == "parked":
            # A non-JSON message parked behind an execution key that is held now.
            park = client.register_script(
                "local held = redis.call('HKEYS', KEYS[1]) "
                "if #held == 0 then return false end "
                "local ek = held[(tonumber(ARGV[2]) % #held) + 1] "
                # a slot above 1 (execution_limit) is `E\0#i`: its line is E's
                "ek = string.gsub(ek, '%z#%d+$', '') "
                "redis.call('HSET', KEYS[2], ARGV[1], 'chaos poison: not a message {') "
                "redis.call('RPUSH', ARGV[3] .. ek, ARGV[1]) return ek")
            job = f"poison-parked-{len(self.faults)}"
            deadline = time.monotonic() + 5
            ek = None
            while ek is None and time.monotonic() < deadline:
                ek = park(keys=[prefix + "holders", prefix + "msg"],
                          args=[job, self.rng.randrange(1000), prefix + "parked:"])
                if ek is None:
                    time.sleep(0.02)
            detail.update(job=job, key=prefix + "parked:" + (ek or b"").decode())
        elif planned.poison == "running":
            # The running record of a worker whose lease ended, with invalid UTF-8.
            instance = b"chaos-dead@host/1/\xff\xfe"
            job = f"poison-running-{len(self.faults)}"
            value = (b'{"job": "' + job.encode() + b'", "task": "chaos.work", "instance": "'
                     + instance + b'", "worker": "chaos-dead@\xff", "ek": "", "qk": "",'
                     b' "queue": "chaos", "admitted_at": 0}')
            client.hset(prefix + "running", job, value)
            client.zadd(prefix + "workers", {instance: 1})
            detail.update(job=job, key=prefix + "running#" + job)
        client.close()
        self.add_fault({"kind": "poison", "t0": t0, "t1": time.time(), **detail})

    # -- watching the workers

    def watch_workers(self, *, replace: bool = True) -> None:
        """Note workers that exited on their own (a failure) and, as an operator's
        supervisor would, start a replacement (at most 6 a run)."""
        with self.lock:
            workers = list(self.workers)
        for w in workers:
            if w.exit_seen is None and not w.killed and w.process.process is not None \
                    and w.process.process.poll() is not None:
                w.exit_seen = time.time()
                log(f"worker {w.name} exited on its own "
                    f"(code {w.process.process.returncode}); log {w.process.log_path}")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(w.pgid, signal.SIGKILL)  # its pool, if any is left
                if replace and self.replacements < 6:
                    self.replacements += 1
                    threading.Thread(target=self.new_worker, daemon=True).start()


class DeathWatch(threading.Thread):
    """When each worker process (main and pool) died, seen through a pidfd (readable the
    moment the process exits): bounds an attempt that never recorded its end, whoever
    killed it (a fault, Celery, roger's own guards). Pool processes are found by reading
    /proc/<main>/task/*/children every 20 ms."""

    def __init__(self, soak: Soak) -> None:
        super().__init__(name="death-watch", daemon=True)
        self.soak = soak
        self.died: dict[int, float] = {}
        self.seen: set[int] = set()
        self.lost_track: set[int] = set()
        self.fds: dict[int, int] = {}  # fd -> pid
        self.poller = select.poll()
        self.stopping = threading.Event()

    def watch(self, pid: int) -> None:
        if pid in self.seen:
            return
        self.seen.add(pid)
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return
        self.fds[fd] = pid
        self.poller.register(fd, select.POLLIN)

    def scan(self) -> None:
        with self.soak.lock:
            mains = [w.process.process.pid for w in self.soak.workers
                     if w.process.process is not None]
        for main in mains:
            self.watch(main)
            with contextlib.suppress(OSError):
                for task in os.listdir(f"/proc/{main}/task"):
                    with contextlib.suppress(OSError), \
                            open(f"/proc/{main}/task/{task}/children") as f:
                        for pid in f.read().split():
                            self.watch(int(pid))

    def run(self) -> None:
        next_scan = 0.0
        while not self.stopping.is_set():
            if time.monotonic() >= next_scan:
                self.scan()
                next_scan = time.monotonic() + 0.02
            for fd, event in self.poller.poll(20):
                now = time.time()
                pid = self.fds.pop(fd, None)
                with contextlib.suppress(KeyError, ValueError):
                    self.poller.unregister(fd)
                if pid is None:
                    continue
                if event & select.POLLNVAL:
                    self.lost_track.add(pid)  # the fd was closed under us: death unseen
                    continue
                self.died[pid] = now
                with contextlib.suppress(OSError):
                    os.close(fd)

    def stop(self) -> None:
        self.stopping.set()
        self.join(5)
        for fd in list(self.fds):
            with contextlib.suppress(OSError):
                os.close(fd)


def log(message: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- reading the outcome -------------------------------------------------------------------


def read_timeline(url: str) -> list[dict[str, Any]]:
    client = redis.Redis.from_url(url)
    try:
        return [json.loads(e) for e in client.lrange("chaos:timeline", 0, -1)]
    finally:
        client.close()


def read_results(url: str, ids: list[str]) -> dict[str, dict[str, Any]]:
    client = redis.Redis.from_url(url, socket_timeout=10)
    out: dict[str, dict[str, Any]] = {}
    try:
        for k in range(0, len(ids), 500):
            chunk = ids[k:k + 500]
            for job_id, raw in zip(chunk, client.mget([f"celery-task-meta-{i}" for i in chunk]),
                                   strict=True):
                if raw is not None:
                    out[job_id] = json.loads(raw)
    finally:
        client.close()
    return out


def roger_leftovers(url: str, partition: str) -> dict[str, Any]:
    """What roger still keeps of the run: the invariant keys, and others for the report."""
    client = redis.Redis.from_url(url, socket_timeout=10)
    p = f"roger:{{{partition}}}:"

    def hash_keys(name: str) -> list[str]:
        if client.type(p + name) != b"hash":
            return [f"<{client.type(p + name).decode()}>"] if client.exists(p + name) else []
        return sorted(k.decode(errors="replace") for k in client.hkeys(p + name))

    try:
        parked = {}
        for key in client.scan_iter(match=f"{p}parked:*", count=1000):
            name = key.decode(errors="replace")
            parked[name[len(p):]] = [v.decode(errors="replace")
                                     for v in client.lrange(key, 0, 20)] \
                if client.type(key) == b"list" else ["<not a list>"]
        found = {"holders": hash_keys("holders"), "qkeys": hash_keys("qkeys"),
                 "msg": hash_keys("msg"), "running": hash_keys("running"), "parked": parked}
        other = {}
        for name in ("retry", "promoting", "qk_pending", "crash_checks", "workers"):
            if client.type(p + name) == b"zset":
                other[name] = client.zcard(p + name)
        for name in ("cancel_reports",):
            kind = client.type(p + name).decode()
            other[name] = client.llen(p + name) if kind == "list" else f"<{kind}>"
        other["quarantine"] = len(hash_keys("quarantine"))
        other["paused"] = hash_keys("paused")
        found["other"] = other
        return found
    finally:
        client.close()


def find_places(soak: Soak, ids: list[str]) -> dict[str, dict[str, Any]]:
    """Where roger's Redis and the broker still keep each of these jobs."""
    if not ids:
        return {}
    p = f"roger:{{{soak.app_module.PARTITION}}}:"
    state = redis.Redis.from_url(soak.state.url, socket_timeout=10)
    broker = redis.Redis.from_url(soak.broker.url, socket_timeout=10)
    places: dict[str, dict[str, Any]] = {i: {"roger": [], "marks": [], "broker": []}
                                         for i in ids}
    try:
        # Where a job waits (marks: what roger remembers of a job that ended).
        checks = [("retry", "zscore"), ("promoting", "zscore"), ("running", "hexists"),
                  ("msg", "hexists"), ("held_msg", "hexists"), ("retry_msg", "hexists"),
                  ("crash_info", "hexists"), ("cancelled", "zscore"), ("buried", "zscore")]
        pipe = state.pipeline(transaction=False)
        for i in ids:
            for name, op in checks:
                getattr(pipe, op)(p + name, i)
        replies = iter(pipe.execute(raise_on_error=False))
        for i in ids:
            for name, _ in checks:
                value = next(replies)
                if value and not isinstance(value, Exception):
                    places[i]["marks" if name in ("cancelled", "buried") else "roger"].append(
                        name)
        wanted = set(ids)
        for key in broker.scan_iter(match="chaos*", count=1000):
            if broker.type(key) != b"list":
                continue
            for raw in broker.lrange(key, 0, -1):
                with contextlib.suppress(ValueError, AttributeError):
                    job = json.loads(raw)["headers"]["id"]
                    if job in wanted:
                        places[job]["broker"].append(f"queued in {key.decode()}")
        if broker.type("unacked") == b"hash":
            for raw in broker.hvals("unacked"):
                with contextlib.suppress(ValueError, AttributeError, IndexError):
                    job = json.loads(raw)[0]["headers"]["id"]
                    if job in wanted:
                        places[job]["broker"].append("unacked")
    except redis.RedisError as exc:
        for i in ids:
            places[i]["error"] = str(exc)
    finally:
        state.close()
        broker.close()
    return places


def ended_unrecorded(soak: Soak, ids: list[str],
                     results: dict[str, dict[str, Any]]) -> set[str]:
    """Jobs whose last attempt recorded its end, whose result was never stored, and that
    neither roger nor the broker keeps: ended, for the drain (the checker judges them)."""
    pending = [i for i in ids
               if (results.get(i) or {}).get("status", "PENDING") in ("PENDING", "RETRY")]
    if not pending:
        return set()
    client = redis.Redis.from_url(soak.timeline_server.url)
    try:
        counts = dict(zip(pending, client.mget([f"chaos:attempts:{i}" for i in pending]),
                          strict=True))
        ended = {(e["job"], e["n"]) for e in map(json.loads,
                                                 client.lrange("chaos:timeline", 0, -1))
                 if e["e"] == "end"}
    finally:
        client.close()
    candidates = [i for i in pending if counts[i] and (i, int(counts[i])) in ended]
    places = find_places(soak, candidates)
    return {i for i in candidates if not places[i]["roger"] and not places[i]["broker"]
            and "error" not in places[i]}


def stuck_count(left: dict[str, Any]) -> int:
    return sum(len(left[k]) for k in ("holders", "qkeys", "msg", "running", "parked"))


# -- the checker -----------------------------------------------------------------------------


@dataclass
class Attempt:
    id: str
    job: str
    ek: str | None
    pid: int
    pgid: int
    start: float
    end: float | None = None
    outcome: str | None = None
    end_by: str = "recorded"  # recorded | fault-kill | library-kill | next-attempt |
    #                            worker-exit (approximate) | open


def find_overlaps(attempts: Iterable[Attempt], freezes: dict[int, list[dict[str, Any]]],
                  t0: float) -> list[dict[str, Any]]:
    """Every time more attempts of one execution key ran at once than its limit allows
    (key_limit: two at once for a key of limit 1): "overlap", "after-freeze" (one was
    frozen past its lease while another took its slot, and went on when it resumed) or
    "uncertain" (within what an approximate end allows)."""
    by_key: dict[str, list[Attempt]] = defaultdict(list)
    for a in attempts:
        if a.ek:
            by_key[a.ek].append(a)
    overlaps: list[dict[str, Any]] = []
    for ek, group in by_key.items():
        group.sort(key=lambda a: a.start)
        for found in crowded(group, key_limit(ek), freezes):
            overlaps.append({**found, "ek": ek, "limit": key_limit(ek),
                             "at": round(found["from"] - t0, 2)})
    return overlaps


def most_at_once(group: list[Attempt]) -> dict[str, int]:
    """Per execution key, the most attempts of ``group`` that ran at once."""
    by_key: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for a in group:
        by_key[a.ek or ""] += [(a.start, 1), (a.end if a.end is not None else a.start, -1)]
    most: dict[str, int] = {}
    for ek, edges in by_key.items():
        running = 0
        for _, step in sorted(edges, key=lambda e: (e[0], e[1])):
            running += step
            most[ek] = max(most.get(ek, 0), running)
    return dict(sorted(most.items()))


def running_pieces(a: Attempt, holes: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The stretches of ``a`` outside its worker's freezes (``end`` None: still open)."""
    end = a.end if a.end is not None else float("inf")
    pieces, cursor = [], a.start
    for lo, hi in sorted(holes):
        if hi <= cursor or lo >= end:
            continue
        if lo > cursor:
            pieces.append((cursor, lo))
        cursor = max(cursor, hi)
    if cursor < end:
        pieces.append((cursor, end))
    return pieces


def crowded(group: list[Attempt], limit: int,
            freezes: dict[int, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The stretches in which more than ``limit`` attempts of ``group`` ran at once (each
    attempt's worker freezes taken out), each classified as find_overlaps says."""
    edges: list[tuple[float, int, int]] = []
    for x, a in enumerate(group):
        for lo, hi in running_pieces(a, [(f["from"], f["to"]) for f in freezes[a.pgid]]):
            edges += [(lo, 1, x), (hi, -1, x)]
    edges.sort(key=lambda e: (e[0], e[1]))  # an end before a start at the same instant
    found: list[dict[str, Any]] = []
    active: set[int] = set()
    for (t, step, x), (t_next, _, _) in zip(edges, [*edges[1:], (float("inf"), 0, 0)],
                                             strict=True):
        if step > 0:
            active.add(x)
        else:
            active.discard(x)
        if len(active) <= limit or t_next <= t:
            continue
        involved = [group[i] for i in sorted(active)]
        seconds = min(t_next, max(a.end or t for a in involved)) - t
        if found and found[-1]["to"] >= t and found[-1]["jobs"] == [a.job for a in involved]:
            found[-1]["to"] = t_next
            found[-1]["seconds"] = round(found[-1]["seconds"] + seconds, 4)
            continue
        found.append({"kind": classify(involved, t, t_next, freezes), "from": t, "to": t_next,
                      "seconds": round(seconds, 4), "jobs": [a.job for a in involved],
                      "same_job": len({a.job for a in involved}) < len(involved),
                      "attempts": [{"job": a.job, "pid": a.pid, "start": a.start,
                                    "end": a.end, "end_by": a.end_by} for a in involved]})
    return found


def classify(involved: list[Attempt], lo: float, hi: float,
             freezes: dict[int, list[dict[str, Any]]]) -> str:
    """What a crowded stretch [lo, hi) of ``involved`` attempts is (see find_overlaps)."""
    # Ends known only as "dead by then": seen through a pidfd (within a few ms), a
    # worker's exit (polled every 0.2 s), or not at all.
    slack = max(APPROXIMATE_ENDS.get(a.end_by, 0.0) for a in involved)
    ends = [a.end for a in involved if a.end is not None]
    if min([hi, *ends]) - lo <= slack:
        return "uncertain"
    for p in involved:
        for f in freezes[p.pgid]:
            # p ran into a freeze longer than its lease, another took its slot meanwhile,
            # and p went on when it resumed.
            if f["seconds"] >= TAKEOVER_FREEZE and p.start < f["from"] and lo >= f["to"] - 0.002:
                return "after-freeze"
    return "overlap"


def check(soak: Soak, timeline: list[dict[str, Any]], results: dict[str, dict[str, Any]],
          left: dict[str, Any], places: dict[str, dict[str, Any]],
          check_time: float) -> tuple[dict[str, Any], list[str]]:
    """The invariants; ``places``: where roger and the broker still keep unfinished jobs."""
    plan = {j.id: j for j in soak.plan.jobs}
    accepted = {i for i, p in soak.published.items() if p.get("ok")}
    refused = {i for i, p in soak.published.items() if "duplicate" in p}
    publish_errors = {i for i, p in soak.published.items() if "error" in p}
    problems: list[str] = []

    attempts: dict[str, Attempt] = {}
    starts_by_pid: dict[int, list[float]] = defaultdict(list)
    library_kills: dict[int, list[float]] = defaultdict(list)
    callbacks: Counter[str] = Counter()
    for e in timeline:
        if e["e"] == "start":
            attempts[e["a"]] = Attempt(e["a"], e["job"], e.get("ek"), e["pid"], e["pgid"],
                                       e["t"])
            starts_by_pid[e["pid"]].append(e["t"])
        elif e["e"] == "end" and e["a"] in attempts:
            a = attempts[e["a"]]
            a.end, a.outcome = e["t"], e["outcome"]
        elif e["e"] == "kill":
            library_kills[e["child"]].append(e["t"])
        elif e["e"] == "cb" and e.get("how"):
            callbacks[f"{e['cb']}:{e['how']}"] += 1
    fault_kills = [f for f in soak.faults if f["kind"] == "kill"]
    freezes: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for f in soak.faults:
        if f["kind"] == "stop":
            # Not running from just after SIGSTOP returned until SIGCONT was sent.
            freezes[f["pgid"]].append({"from": f["t1"] + 0.002, "to": f["t2"],
                                       "seconds": f["t2"] - f["t1"]})
    exits = {w.pgid: w.exit_seen for w in soak.workers if w.exit_seen is not None}

    # An attempt that never recorded its end ends at the kill that stopped it.
    ended_by: Counter[str] = Counter()
    for a in attempts.values():
        if a.end is not None:
            continue
        bounds: list[tuple[float, str]] = []
        bounds += [(f["t1"], "fault-kill") for f in fault_kills
                   if f["pgid"] == a.pgid and f["t1"] >= a.start]
        bounds += [(t, "library-kill") for t in library_kills.get(a.pid, []) if t >= a.start]
        bounds += [(t, "next-attempt") for t in starts_by_pid[a.pid] if t > a.start]
        if a.pid in soak.deaths.died and soak.deaths.died[a.pid] >= a.start:
            bounds.append((soak.deaths.died[a.pid], "death-seen"))
        if a.pgid in exits and exits[a.pgid] >= a.start:
            bounds.append((exits[a.pgid], "worker-exit"))
        if bounds:
            a.end, a.end_by = min(bounds)
        elif os.path.exists(f"/proc/{a.pid}"):
            a.end, a.end_by = check_time, "open"  # still running
        else:
            a.end, a.end_by = check_time, "death-unseen"  # died unseen: when is unknown
        ended_by[a.end_by] += 1

    # 1. Never two holders of one execution key at once.
    overlaps = find_overlaps(attempts.values(), freezes, soak.t0)
    hard = [o for o in overlaps if o["kind"] == "overlap"]
    if hard:
        problems.append(f"(1) two holders of one execution key at once, {len(hard)} times; "
                        f"first: {json.dumps(hard[:3])}")

    # 2. Every accepted job ended, the way its plan (or a cancel, or a crash) allows.
    attempts_of: dict[str, list[Attempt]] = defaultdict(list)
    for a in attempts.values():
        attempts_of[a.job].append(a)
    outcomes: Counter[str] = Counter()
    lost: list[dict[str, Any]] = []
    wrong: list[dict[str, Any]] = []
    restarts = [f for f in soak.faults if f["kind"] == "restart"]
    callbacks_of: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in timeline:
        if e["e"] == "cb" and e["cb"] not in ("before_run", "after_run"):
            callbacks_of[e["job"]].append(e)
    crash_reported = {e["job"] for e in timeline if e["e"] == "cb"
                      and e["cb"] in ("on_error", "on_buried") and e.get("error") in CRASH_ERRORS}
    not_stored: list[dict[str, Any]] = []
    in_flight: list[dict[str, Any]] = []
    worker_logs = [w.process.log() for w in soak.workers]
    for job_id in sorted(accepted):
        job = plan[job_id]
        meta = results.get(job_id) or {}
        state = meta.get("status", "PENDING")
        ran = sorted(attempts_of.get(job_id, []), key=lambda a: a.start)
        # A crash of an attempt (killed, or reported as WorkerCrashed even before its
        # body began) consumes a step of a retryable job's sequence.
        crashed = any(a.end_by != "recorded" for a in ran) or job_id in crash_reported
        error = (meta.get("result") or {}).get("exc_type") if state == "FAILURE" else None
        cancelled = job_id in soak.cancels
        if state not in FINAL:
            last = ran[-1] if ran else None
            where = places.get(job_id, {})
            retry_due = job.task == "flaky" and last is not None and last.outcome != "ok" \
                and len(ran) <= len(RETRY_LEVELS) and not cancelled
            # Its worker logged the retry of its last attempt as recorded in roger's Redis
            # (then published when due: what became of it is judged below).
            retry_recorded = retry_due and any(re.search(
                rf"\[{re.escape(job_id)}\] failed \(.*\); retry {len(ran)} in", log)
                for log in worker_logs)
            if state in ("PENDING", "RETRY") and last is not None \
                    and last.end_by == "recorded" and not retry_recorded \
                    and not where.get("roger") and not where.get("broker") and any(
                        f["t0"] - 1 <= last.end <= f["t1"] + 21 for f in restarts):
                # It ended (the timeline shows it) while the results' Redis restarted:
                # Celery's result backend could not store its outcome (trace.py: the
                # read before the write is not retried). Celery's, not roger's.
                entry = {"job": job_id, "last_outcome": last.outcome, "natural": job.natural,
                         "attempts": len(ran), "at": round(last.end - soak.t0, 2)}
                if retry_due:
                    # A retryable job that failed while roger's Redis was down, and was
                    # neither retried nor buried: its retry was dropped.
                    wrong.append({**entry, "state": state, "why": "retry not recorded"})
                    outcomes["retry-dropped"] += 1
                    continue
                not_stored.append(entry)
                outcomes[f"ended-result-not-stored-{last.outcome}"] += 1
                continue
            published = soak.published[job_id]["t"]
            if state == "RETRY" and last is not None and last.outcome != "ok" \
                    and len(ran) <= len(RETRY_LEVELS):
                # Its retry was published again by a worker's tick when due.
                published = last.end + RETRY_LEVELS[len(ran) - 1]
            kills = [f for f in soak.faults if f["kind"] == "kill"
                     and f["t0"] - 1.0 <= published <= f["t1"] + 0.5]
            # Every delivery is logged once as received; one that was parked is delivered
            # again when promoted. A delivery more than its attempts (not counting those
            # parked) is one that never ran.
            deliveries = sum(log.count(f"[{job_id}] received")
                             - log.count(f"[{job_id}]: execution key") for log in worker_logs)
            if state in ("PENDING", "RETRY") and deliveries <= len(ran) and kills \
                    and not where.get("roger") and not where.get("broker") \
                    and "error" not in where:
                # Never received by any worker, nowhere in the broker or in roger, and
                # published the moment a worker was SIGKILLed: lost by kombu's Redis
                # transport, which pops a message before recording it as unacked (issue
                # 12 #5; roger can only free its queue key, which checks 3 and 4 see).
                in_flight.append({"job": job_id, "qk": job.qk,
                                  "published_at": round(published - soak.t0, 3),
                                  "kill_at": round(kills[0]["t0"] - soak.t0, 3)})
                continue
            restarts_near = [f for f in soak.faults if f["kind"] == "restart"
                                 and published - 1.0 <= f["t1"] and f["t0"] <= published + 30]
            if state == "PENDING" and restarts_near and any(
                    f"Killed job {job_id}: this worker lost its roger lease" in log
                    for log in worker_logs):
                # Stopped with its worker's lease while roger's Redis, which also holds the
                # results here, was down: its FAILURE(WorkerCrashed) could not be stored.
                not_stored.append({"job": job_id, "last_outcome": "stopped-with-the-lease",
                                   "natural": job.natural, "attempts": len(ran),
                                   "at": round(published - soak.t0, 2)})
                outcomes["stopped-result-not-stored"] += 1
                continue
            lost.append({"job": job_id, "state": state, "attempts": len(ran),
                         "last_attempt": None if last is None else
                         {"pid": last.pid, "outcome": last.outcome, "end_by": last.end_by,
                          "at": round(last.start - soak.t0, 2)},
                         "ek": job.ek, "qk": job.qk, "cancelled": cancelled,
                         "published_at": round(published - soak.t0, 2),
                         "faults_near_publish": [
                             f"{f['kind']}@{f['at']}" for f in soak.faults
                             if -10 <= f["t0"] - published <= 10],
                         "where": where,
                         "callbacks": [f"{e['cb']}({e.get('error') or ''})"
                                       for e in callbacks_of.get(job_id, [])],
                         "log": log_hints(worker_logs, job_id) if len(lost) < 20 else []})
            continue
        if state == "FAILURE" and error in REDIS_DOWN_ERRORS and ran \
                and ran[-1].outcome == "ok" and ran[-1].end is not None and any(
                    f["t0"] - 1 <= ran[-1].end <= f["t1"] + 21 for f in restarts):
            # Its body succeeded while the results' Redis restarted: Celery could not store
            # SUCCESS and stored its own error instead ("Exception raised outside body",
            # trace.py). Celery's, not roger's: roger released its keys (reconcile). The
            # soak's app sets result_backend_always_retry, which makes this rare.
            not_stored.append({"job": job_id, "last_outcome": "ok-stored-as-" + error,
                               "natural": job.natural, "attempts": len(ran),
                               "at": round(ran[-1].end - soak.t0, 2)})
            outcomes["ended-result-store-failed"] += 1
            continue
        if state == "SUCCESS":
            ok = job.natural == "success" and any(a.outcome == "ok" for a in ran)
            kind = "success"
        elif state == "REVOKED":
            ok, kind = cancelled, "cancelled"
        elif error in CRASH_ERRORS:
            ok, kind = True, "failed-crash"  # the crash of an attempt: fails it, or buries it
        else:
            ok = job.natural in ("failed", "buried") or (job.task == "flaky" and crashed)
            kind = "buried" if job.task == "flaky" else "failed"
        outcomes[kind] += 1
        if not ok:
            wrong.append({"job": job_id, "state": state, "error": error,
                          "natural": job.natural, "cancelled": cancelled,
                          "attempts": len(ran), "crashed": crashed,
                          "outcomes": [a.outcome or a.end_by for a in ran]})
    if lost:
        problems.append(f"(2) {len(lost)} accepted jobs never ended: {json.dumps(lost[:8])}")
    if wrong:
        problems.append(f"(2) {len(wrong)} jobs ended in a state their plan does not allow "
                        f"(REVOKED without a cancel is a lost job): {json.dumps(wrong[:8])}")

    # Duplicates: a job that ran to completion more than once, explained by a fault.
    timed = [f for f in soak.faults if f["kind"] in ("kill", "stop", "broker", "restart",
                                                        "poison")]
    duplicates: Counter[str] = Counter()
    unexplained: list[dict[str, Any]] = []
    for job_id, ran in attempts_of.items():
        done = sorted((a for a in ran if a.outcome == "ok"), key=lambda a: a.start)
        for prev, this in itertools.pairwise(done):
            # The first run's message was not acked in time (its worker died or stalled,
            # the broker stalled, roger lost its Redis): a fault between that run's start
            # and the moment its message would have come back.
            lo, hi = prev.start - 1.0, min(this.start, prev.end + VISIBILITY + 1.0)
            cause = None
            for f in timed:
                end = f.get("t2", f["t1"])
                if f["kind"] in ("kill", "stop") and f["pgid"] in (prev.pgid, this.pgid) \
                        and f["t0"] <= hi and end >= lo:
                    cause = f"{f['kind']} of its worker"
                    break
            if cause is None:
                # A worker that held one of its deliveries unacked (received, then frozen
                # or killed before it ran or acked it; its retry may have run elsewhere)
                # let the visibility timeout deliver the job again.
                for f in timed:
                    if f["kind"] in ("kill", "stop") and f["t0"] <= hi \
                            and f.get("t2", f["t1"]) >= lo - VISIBILITY - 2 * sum(RETRY_LEVELS):
                        cause = f"{f['kind']} of a worker holding it unacked"
                        break
            if cause is None:  # its message may have waited a visibility timeout before
                for f in timed:
                    if f["kind"] not in ("kill", "stop") and f["t0"] <= hi \
                            and f.get("t2", f["t1"]) >= lo - VISIBILITY - 1.0:
                        cause = f"{f['kind']} (during)"
                        break
            if cause is None:
                cause = "unexplained"
                unexplained.append({"job": job_id, "first": prev.start - soak.t0,
                                    "again": this.start - soak.t0,
                                    "pids": [prev.pid, this.pid]})
            duplicates[cause] += 1
    if unexplained:
        problems.append(f"(2) {len(unexplained)} duplicate runs that no fault explains: "
                        f"{json.dumps(unexplained[:8])}")

    # 3. and 4. No key held, nothing left in msg, running, parked:* after the drain.
    stuck = stuck_count(left)
    if left["holders"] or left["qkeys"]:
        problems.append(f"(3) keys held after the drain: holders={left['holders'][:10]} "
                        f"qkeys={left['qkeys'][:10]}")
    if left["msg"] or left["running"] or left["parked"]:
        problems.append(f"(4) left after the drain: msg={left['msg'][:10]} "
                        f"running={left['running'][:10]} "
                        f"parked={dict(list(left['parked'].items())[:5])}")

    # Also: a refused duplicate never runs; nothing starts after its cancel returned.
    refused_ran = sorted(refused & set(attempts_of))
    if refused_ran:
        problems.append(f"a job refused as a duplicate ran: {refused_ran[:8]}")
    after_cancel = []
    for job_id, c in soak.cancels.items():
        if "t1" in c:
            late = [a for a in attempts_of.get(job_id, []) if a.start > c["t1"] + 0.1]
            if late:
                after_cancel.append({"job": job_id, "where": c.get("where"),
                                     "cancelled_at": round(c["t1"] - soak.t0, 2),
                                     "started_at": round(late[0].start - soak.t0, 2)})
    if after_cancel:
        problems.append(f"{len(after_cancel)} jobs started after their cancel returned: "
                        f"{json.dumps(after_cancel[:8])}")
    # A publish may fail while roger's Redis restarts or the broker stalls, not otherwise.
    outages = [(f["t0"] - 1.0, f["t1"] + 2.0) for f in soak.faults
               if f["kind"] in ("restart", "broker")]
    odd_errors = sorted(
        (round(soak.published[i]["t"] - soak.t0, 2), soak.published[i]["error"][:120])
        for i in publish_errors
        if not any(lo <= soak.published[i]["t"] <= hi for lo, hi in outages))
    if odd_errors:
        problems.append(f"{len(odd_errors)} publishes failed outside any outage: "
                        f"{odd_errors[:5]}")
    died = [w.name for w in soak.workers if w.exit_seen is not None]
    if died:
        problems.append(f"workers stopped on their own: {died} (logs in {soak.log_dir})")
    if soak.start_failures:
        problems.append(f"workers failed to start: {json.dumps(soak.start_failures)}")
    if not soak.deaths.is_alive():
        soak.harness_errors.append("the death watch stopped: ends of killed attempts unseen")
    if soak.harness_errors:
        problems.append(f"harness errors: {soak.harness_errors}")

    # Info: on_error(WorkerCrashed) for a job that ran once, to its end, and succeeded.
    crash_reports = Counter(e["job"] for e in timeline if e["e"] == "cb"
                            and e["cb"] == "on_error" and e.get("error") == "WorkerCrashed")
    false_crashes = sorted(
        j for j in crash_reports
        if (results.get(j) or {}).get("status") == "SUCCESS"
        and [a.end_by for a in attempts_of.get(j, [])] == ["recorded"])
    fault_counts = Counter(f["kind"] for f in soak.faults)
    if "callbacks" in FAULTS:
        fault_counts["callbacks"] = sum(callbacks.values())
    figures = {
        "seed": SEED, "seconds": SECONDS, "fault_kinds": list(FAULTS),
        "jobs": {"planned": len(plan), "accepted": len(accepted), "refused_duplicate":
                 len(refused), "publish_errors": len(publish_errors),
                 "cancel_requested": len(soak.cancels),
                 "cancel_failed": sum(1 for c in soak.cancels.values() if "t1" not in c)},
        "publish_error_kinds": dict(Counter(
            soak.published[i]["error"][:90] for i in publish_errors).most_common(4)),
        "publish_errors_from_to": [
            round(min(soak.published[i]["t"] for i in publish_errors) - soak.t0, 1),
            round(max(soak.published[i]["t"] for i in publish_errors) - soak.t0, 1)]
        if publish_errors else [],
        "outcomes": dict(outcomes),
        "attempts": len(attempts),
        "faults": dict(fault_counts),
        "fault_detail": [{k: v for k, v in f.items() if k not in ("t0", "t1", "t2", "t3")}
                         for f in soak.faults],
        "callbacks_misbehaving": dict(callbacks),
        "overlaps": len(hard),
        # (the limit-3 keys did run several at once: the soak exercised their slots)
        "limited_keys_most_at_once": most_at_once(
            [a for a in attempts.values() if a.ek and key_limit(a.ek) > 1]),
        "overlaps_after_freeze_beyond_lease": sum(o["kind"] == "after-freeze" for o in overlaps),
        "overlaps_uncertain": sum(o["kind"] == "uncertain" for o in overlaps),
        "lost": len(lost), "wrong_end": len(wrong),
        "result_not_stored_in_restart": len(not_stored),
        "lost_in_flight_at_kill": len(in_flight),
        "stuck_keys": stuck,
        "duplicates": dict(duplicates),
        "attempts_without_end": dict(ended_by),
        "refused_but_ran": len(refused_ran),
        "crash_reports": sum(crash_reports.values()),
        "false_crash_reports": len(false_crashes),
        "started_after_cancel": len(after_cancel),
        "publish_failed_but_ran": len(publish_errors & set(attempts_of)),
        "publish_errors_outside_outages": len(odd_errors),
        "workers_started": len(soak.workers), "workers_died": len(died),
        "processes_watched": len(soak.deaths.seen),
        "deaths_seen": len(soak.deaths.died), "deaths_lost_track": len(soak.deaths.lost_track),
        "worker_start_failures": len(soak.start_failures),
        "roger_other": left["other"],
    }
    detail = {"figures": figures, "overlaps": overlaps, "lost": lost, "wrong": wrong,
              "result_not_stored": not_stored, "lost_in_flight": in_flight,
              "unexplained_duplicates": unexplained, "after_cancel": after_cancel,
              "leftovers": left, "faults": soak.faults}
    return {"figures": figures, "detail": detail}, problems


def log_hints(logs: list[str], job_id: str) -> list[str]:
    """The worker log lines about a job that say what roger did with it (for triage)."""
    words = ("Killed", "could not", "lost", "crash", "Crash", "failed", "Cannot", "stops")
    hints = []
    for text in logs:
        for line in text.splitlines():
            if job_id in line and any(w in line for w in words):
                hints.append(line[:200])
    return hints[:6]


def log_signals(soak: Soak) -> dict[str, int]:
    """Lines in the workers' logs worth a look (for the report, not the verdict)."""
    needles = {"unrecoverable": "Unrecoverable error", "thread_died": "Exception in thread",
               "lease_lost": "lease not renewed", "killed_job": "Killed job",
               "callback_raised": "roger callback", "traceback": "Traceback"}
    counts: Counter[str] = Counter()
    for w in soak.workers:
        text = w.process.log()
        for name, needle in needles.items():
            counts[name] += text.count(needle)
    return dict(counts)


# -- the test ----------------------------------------------------------------------------------


def test_chaos_soak(request: pytest.FixtureRequest) -> None:
    capture = request.config.pluginmanager.getplugin("capturemanager")
    shown = capture.global_and_fixture_disabled if capture else contextlib.nullcontext
    plan = make_plan(SEED, SECONDS, FAULTS, POISONS, CALLBACKS)
    log_dir = Path(tempfile.mkdtemp(prefix="roger-chaos-"))
    with shown():
        schedule = [(round(f.at, 1), f.kind, round(f.duration, 1), f.poison)
                    for f in plan.faults]
        print(f"\nCHAOS {replay_hint()}\nCHAOS jobs={len(plan.jobs)} faults={schedule} "
              f"logs={log_dir}", flush=True)
    soak = Soak(plan, log_dir)
    problems: list[str] = []
    try:
        soak.start_servers()
        soak.deaths.start()
        soak.start_workers()
        log(f"{len(soak.alive_workers())} workers ready")
        soak.t0 = time.time() + 0.5
        threads = [threading.Thread(target=guarded(soak, soak.publish_all), name="publisher"),
                   threading.Thread(target=guarded(soak, soak.inject_all), name="faults")]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            soak.watch_workers()
            time.sleep(0.2)
        published = time.time()
        log(f"published {len(soak.published)} in {published - soak.t0:.0f}s; draining")

        # Drain: until every accepted job is in a final state (bounded; stops early when
        # nothing moved for a while).
        accepted = sorted(i for i, p in soak.published.items() if p.get("ok"))
        unfinished: list[str] = accepted
        last_change, previous = time.time(), len(accepted) + 1
        while unfinished and time.time() - published < DRAIN_SECONDS:
            soak.watch_workers()
            try:
                results = read_results(soak.state.url, unfinished)
            except redis.RedisError as exc:
                log(f"cannot read results yet: {exc}")
                time.sleep(1)
                continue
            unfinished = [i for i in unfinished
                          if (results.get(i) or {}).get("status") not in FINAL]
            if 0 < len(unfinished) <= 100:
                done = ended_unrecorded(soak, unfinished, results)
                unfinished = [i for i in unfinished if i not in done]
            if len(unfinished) != previous:
                previous, last_change = len(unfinished), time.time()
            elif time.time() - last_change > 30:
                break
            if unfinished:
                time.sleep(1)
        drained = time.time()
        log(f"drain: {len(unfinished)} unfinished after {drained - published:.0f}s")

        # Settle: dead workers' leases end, grace periods pass, then the keys must be free.
        partition = soak.app_module.PARTITION
        left = roger_leftovers(soak.state.url, partition)
        while stuck_count(left) and time.time() - drained < SETTLE_SECONDS:
            time.sleep(0.5)
            soak.watch_workers()
            left = roger_leftovers(soak.state.url, partition)
        check_time = time.time()
        timeline = read_timeline(soak.timeline_server.url)
        results = read_results(soak.state.url, accepted)
        places = find_places(soak, [i for i in accepted
                                    if (results.get(i) or {}).get("status") not in FINAL])
        outcome, problems = check(soak, timeline, results, left, places, check_time)
        figures = outcome["figures"]
        figures["drain_s"] = round(drained - published, 1)
        figures["total_s"] = round(time.time() - soak.t0, 1)
        figures["worker_log_lines"] = log_signals(soak)
        if outcome["detail"]["lost"]:
            figures["lost_sample"] = explain(
                soak, [e["job"] for e in outcome["detail"]["lost"][:5]])
        report = log_dir / "chaos-report.json"
        report.write_text(json.dumps(outcome["detail"], indent=1, default=str))
        with shown():
            print(f"\nFIGURES chaos: {json.dumps(figures, sort_keys=True)}\n"
                  f"CHAOS details: {report}", flush=True)
    except Exception:
        problems.append(f"harness error:\n{traceback.format_exc()}")
    finally:
        soak.teardown()
    if problems:
        pytest.fail(f"[chaos {replay_hint()}]\n" + "\n".join(f"- {p}" for p in problems)
                    + f"\n(worker logs and chaos-report.json in {log_dir})", pytrace=False)


def guarded(soak: Soak, fn: Any) -> Any:
    def run() -> None:
        try:
            fn()
        except Exception:
            soak.harness_errors.append(f"{fn.__name__}: {traceback.format_exc()}")
            log(f"{fn.__name__} failed: {traceback.format_exc()}")
    return run


def explain(soak: Soak, ids: list[str]) -> list[dict[str, Any]]:
    """roger's own view of a few lost jobs (job(): where it is, and why)."""
    from celery_roger import Roger

    out = []
    roger = Roger(soak.app_module.app)
    for job_id in ids:
        try:
            view = roger.job(job_id)
            out.append({"job": job_id, "state": view.get("state"),
                        "explanation": str(view.get("explanation"))[:200]})
        except Exception as exc:
            out.append({"job": job_id, "error": f"{type(exc).__name__}: {exc}"[:200]})
    return out
