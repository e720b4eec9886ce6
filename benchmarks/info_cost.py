"""What Roger(app).info() and .job() cost with 100k parked jobs (a private Redis).

    .venv/bin/python benchmarks/info_cost.py
"""

from __future__ import annotations

import statistics
import time

from celery import Celery

from celery_roger import Roger
from celery_roger.testing import RedisServer


def main() -> None:
    with RedisServer() as server:
        app = Celery("info_cost", broker=server.url)
        roger = Roger(app)
        store = roger.store
        holder = {"job": "holder", "instance": "bench", "queue": "default", "worker": "w@h"}
        store.renew("bench", registered=False)
        store.admit("holder", instance="bench", execution_key="hot", info=holder, message={})
        started = time.perf_counter()
        for i in range(100_000):
            if i % 1000 == 0:
                store.renew("bench")
            key = f"k{i % 100}" if i % 2 else "hot"
            store.admit(f"p{i}", instance="bench", execution_key=key,
                        info={"job": f"p{i}", "instance": "bench", "queue": "default"},
                        message={"headers": {"roger": {"q": "default", "ek": key}},
                                 "body": ""})
        print(f"parked 100k jobs in {time.perf_counter() - started:.1f}s")
        times = []
        for _ in range(20):
            started = time.perf_counter()
            info = roger.info()
            times.append(time.perf_counter() - started)
        print(f"info(): {info['parked']} parked, {info['execution_keys']['count']} held keys: "
              f"median {statistics.median(times) * 1000:.1f} ms, max {max(times) * 1000:.1f} ms")
        started = time.perf_counter()
        view = roger.job("p99998")
        print(f"job() of a job parked 50,000th in line: "
              f"{(time.perf_counter() - started) * 1000:.1f} ms: {view['explanation']}")
        app.close()


if __name__ == "__main__":
    main()
