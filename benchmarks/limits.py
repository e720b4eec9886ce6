"""Issue 16's limits, measured with real workers against a private Redis:

* achieved start rate over a window of ``--seconds`` (default 30) for ``rate="10/s"`` on
  two workers, against Celery's own ``rate_limit="10/s"`` on the same two workers;
* start latency of a job released by an opening window (its start minus the moment the
  window let it: the start of the job N places ahead, plus the window) and by a freed
  slot (``execution_limit=3``: its start minus the end that freed its slot), p50/p99;
* Redis round trips (script calls) per job, publish and run, for each option.

    .venv/bin/python benchmarks/limits.py [--seconds 30]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--json", default=str(HERE / "limits-results.json"))
    opts = parser.parse_args()
    from celery_roger.testing import RedisServer, WorkerProcess

    with RedisServer() as server:
        os.environ["BENCH_REDIS_URL"] = server.url
        import bench_app as b

        r = b.r
        env = {"BENCH_REDIS_URL": server.url, "PYTHONPATH": str(HERE)}

        def marks(run: str) -> list[tuple[str, float]]:
            return [(k, float(t)) for k, t in (m.decode().split() for m in
                                               r.lrange(f"marks:{run}", 0, -1))]

        def workers(queue: str, n: int = 2) -> list:
            return [WorkerProcess("bench_app", concurrency=2, queues=[queue], env=env,
                                  cwd=str(HERE)).start() for _ in range(n)]

        def run_rate(task, per_call: dict, count: int) -> tuple[str, list[float]]:
            run, queue = uuid.uuid4().hex[:6], f"rate-{uuid.uuid4().hex[:6]}"
            ws = workers(queue)
            try:
                for i in range(count):
                    task.apply_async((run, i), queue=queue, **per_call)
                deadline = time.monotonic() + opts.seconds * 3 + 60
                while len(marks(run)) < count and time.monotonic() < deadline:
                    time.sleep(0.1)
            finally:
                for w in ws:
                    w.stop()
            return run, sorted(t for _, t in marks(run))

        results: dict = {"seconds": opts.seconds}
        configured = 10.0
        count = int(configured * opts.seconds) + 20
        _, roger_starts = run_rate(b.rated, {"rate": "10/s", "rate_key": "bench"}, count)
        _, celery_starts = run_rate(b.celery_rated, {}, int(count * 2.2))

        def achieved(starts: list[float]) -> float:
            t0 = starts[0]
            return sum(1 for t in starts if t < t0 + opts.seconds) / opts.seconds

        def shortest(starts: list[float], n: int = 11) -> float:
            """The shortest time in which ``n`` starts happened (a rate of 10/s means
            never 11 within a second: at least 1 s)."""
            return min(starts[i + n - 1] - starts[i] for i in range(len(starts) - n + 1))

        window = 1.0
        opened = [roger_starts[i] - (roger_starts[i - 10] + window)
                  for i in range(10, len(roger_starts))]
        results["rate"] = {
            "configured per second": configured,
            "roger rate='10/s', 2 workers: achieved per second": round(achieved(roger_starts), 3),
            "Celery rate_limit='10/s', 2 workers: achieved per second":
                round(achieved(celery_starts), 3),
            "roger: shortest time for 11 starts, s (by each job's admission, on the "
            "worker's clock)": round(shortest(roger_starts), 4),
            "Celery: shortest time for 11 starts, s": round(shortest(celery_starts), 4),
            "roger: start after its window opened, p50 ms": round(
                statistics.median(opened) * 1000, 1),
            "roger: start after its window opened, p99 ms": round(
                percentile(opened, 0.99) * 1000, 1),
        }

        # -- a freed slot: execution_limit=3, 150 jobs of 50 ms on one key ---------------
        run, queue = uuid.uuid4().hex[:6], f"slot-{uuid.uuid4().hex[:6]}"
        ws = workers(queue)
        try:
            for i in range(150):
                b.slotted.apply_async((run, i), queue=queue, execution_key="bench-slots",
                                      execution_limit=3)
            deadline = time.monotonic() + 120
            while len(marks(run)) < 300 and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            for w in ws:
                w.stop()
        m = marks(run)
        starts = sorted(t for k, t in m if k == "s")
        ends = sorted(t for k, t in m if k == "e")
        freed = [starts[i] - ends[i - 3] for i in range(3, len(starts))]
        running, most = 0, 0
        for k, _ in sorted(m, key=lambda x: x[1]):
            running += 1 if k == "s" else -1
            most = max(most, running)
        results["slots"] = {
            "most running at once (limit 3)": most,
            "start after a slot freed, p50 ms": round(statistics.median(freed) * 1000, 1),
            "start after a slot freed, p99 ms": round(percentile(freed, 0.99) * 1000, 1),
        }

        # -- Redis round trips per job, by option ------------------------------------------
        def scripts() -> int:
            stats = r.info("commandstats")
            return sum(stats.get(k, {}).get("calls", 0) for k in ("cmdstat_evalsha",
                                                                  "cmdstat_eval"))

        options = {
            "no key": {},
            "queue key": {"queue_key": "qk"},
            "queue key, queue_key_until='start'": {"queue_key": "qk",
                                                   "queue_key_until": "start"},
            "queue key, on_duplicate='replace'": {"queue_key": "qk",
                                                  "on_duplicate": "replace"},
            "execution key": {"execution_key": "ek"},
            "execution key, execution_limit=3": {"execution_key": "ek", "execution_limit": 3},
            "rate='1000/s'": {"rate": "1000/s"},
            "execution key and rate": {"execution_key": "ek", "rate": "1000/s"},
        }
        trips = {}
        n = 300
        for name, per_call in options.items():
            queue = f"trips-{uuid.uuid4().hex[:6]}"
            counter = f"count:{queue}"
            before = scripts()
            for i in range(n):
                call = {k: (f"{v}:{i}" if k in ("queue_key", "execution_key") else v)
                        for k, v in per_call.items()}
                b.counted.apply_async(kwargs={"counter": counter, "n": i}, queue=queue, **call)
            published = scripts() - before
            ws = workers(queue, 1)
            started = time.monotonic()
            try:
                while int(r.get(counter) or 0) < n:
                    time.sleep(0.01)
                alive = time.monotonic() - started
                ran = scripts() - before - published
            finally:
                for w in ws:
                    w.stop()
            trips[name] = {"publish": round(published / n, 2),
                           "run (less ~2 lease and tick calls a second)":
                               round(max(0.0, ran - 2 * alive) / n, 2)}
        results["round trips per job"] = trips

    Path(opts.json).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
