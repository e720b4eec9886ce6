"""Time from cancel() to a running job's REVOKED, job starts after pause() returned, and
time from resume() to the first start, with a real prefork worker (tests/apps/roger_app).

    .venv/bin/python benchmarks/cancel_pause_timing.py
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

from celery_roger.testing import RedisServer, WorkerProcess

APPS = Path(__file__).resolve().parents[1] / "tests" / "apps"


def figures(values: list[float]) -> str:
    return (f"median {statistics.median(values) * 1000:.0f} ms, "
            f"max {max(values) * 1000:.0f} ms")


def main() -> None:
    with RedisServer() as server:
        os.environ.update(ROGER_TEST_REDIS_URL=server.url, ROGER_TEST_QUEUE="timing")
        sys.path.insert(0, str(APPS))
        import roger_app as m

        from celery_roger import Roger

        roger = Roger(m.app)
        env = {"ROGER_TEST_REDIS_URL": server.url, "ROGER_TEST_QUEUE": "timing",
               "PYTHONPATH": str(APPS)}
        worker = WorkerProcess("roger_app", queues=["timing"], env=env, cwd=str(APPS),
                               concurrency=2).start()

        def attempts(run: str) -> list[dict]:
            entries = [json.loads(e) for e in m.timeline.lrange(f"timeline:{run}", 0, -1)]
            return [e for e in entries if e["event"] == "attempt"]

        def wait(predicate) -> None:
            deadline = time.monotonic() + 30
            while not predicate():
                if time.monotonic() > deadline:
                    raise SystemExit("timed out")
                time.sleep(0.005)

        cancels, resumes, late_starts = [], [], []
        try:
            for i in range(5):
                run = f"c{i}"
                job = m.fragile.delay(run, "a", "sleep", 10)
                wait(lambda run=run: attempts(run))
                started = time.time()
                roger.cancel(job.id)
                wait(lambda job=job: m.app.AsyncResult(job.id).state == "REVOKED")
                cancels.append(time.time() - started)
            for i in range(20):
                run = f"p{i}"
                jobs = [m.fragile.delay(run, f"j{k}", "sleep", 0.2) for k in range(6)]
                wait(lambda run=run: attempts(run))
                roger.pause("timing")
                paused = time.time()
                time.sleep(1.5)
                late_starts.append(len([e for e in attempts(run) if e["t"] > paused]))
                resumed = time.time()
                roger.resume("timing")
                wait(lambda run=run, resumed=resumed: [e for e in attempts(run)
                                                       if e["t"] > resumed])
                resumes.append(min(e["t"] for e in attempts(run) if e["t"] > resumed) - resumed)
                for job in jobs:
                    job.get(timeout=20)
        finally:
            worker.stop()
        print("cancel() call -> running job REVOKED:", figures(cancels))
        print("job starts after pause() returned:", late_starts)
        print("resume() -> first start:", figures(resumes))


if __name__ == "__main__":
    main()
