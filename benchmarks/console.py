"""What the console's API calls cost with 100,000 parked jobs and 10,000 buried jobs (a
private Redis, the real dashboard server over HTTP).

    .venv/bin/python benchmarks/console.py

Each page is fetched 20 times; the table gives the median and the slowest, in ms.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
import urllib.parse
import urllib.request

from celery import Celery
from werkzeug.serving import make_server

from celery_roger import Roger
from celery_roger.dashboard import create_app
from celery_roger.testing import RedisServer

PARKED = 100_000
BURIED = 10_000
TASKS = [f"app.tasks.t{i}" for i in range(5)]
ERRORS = ["ValueError", "KeyError", "TimeoutError", "ConnectionError"]


def fill(roger: Roger) -> None:
    store = roger.store
    store.renew("bench", registered=False)
    started = time.perf_counter()
    for i in range(PARKED + 101):
        if i % 1000 == 0:
            store.renew("bench")
        key = "hot" if i % 2 else f"k{i % 100}"  # half behind one key, half behind 100
        message = {"kind": "message", "headers": {"task": TASKS[i % 5],
                                                  "roger": {"q": "default", "ek": key}},
                   "body": ""}
        store.admit(f"p{i}", instance="bench", execution_key=key,
                    info={"job": f"p{i}", "instance": "bench", "queue": "default"},
                    message=message)
    for i in range(BURIED):
        queue = f"q{i % 3}"
        store.bury(f"b{i}", queue, {
            "id": f"b{i}", "task": TASKS[i % 5], "queue": queue, "args": [i], "kwargs": {},
            "error": f"{ERRORS[i % 4]}: failed", "error_type": ERRORS[i % 4],
            "traceback": "Traceback (most recent call last):\n" + "  ...\n" * 20,
            "retry_count": 3, "kind": "buried", "publish": {"kind": "entry"}})
    print(f"filled: {PARKED:,} parked, {BURIED:,} buried in "
          f"{time.perf_counter() - started:.0f} s")


def timed(url: str) -> tuple[float, float, dict]:
    times = []
    for _ in range(20):
        started = time.perf_counter()
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = resp.read()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), max(times), json.loads(body)


def main() -> None:
    with RedisServer() as server:
        app = Celery("console_bench", broker=server.url)
        app.conf.update(roger_buried_max=BURIED)
        roger = Roger(app)
        fill(roger)
        web = create_app(roger, None)
        http = make_server("127.0.0.1", 0, web, threaded=True)
        threading.Thread(target=http.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{http.server_port}/api/roger"
        deep = roger.browse("parked", key="hot", limit=500, cursor="40000")
        buried_deep = roger.browse("buried", limit=500)
        for _ in range(10):  # 5,000 buried in
            buried_deep = roger.browse("buried", limit=500, cursor=buried_deep["cursor"])
        pages = {
            "info (the overview)": "/info",
            "parked lines (execution keys with a line)": "/lists/parked?limit=50",
            "parked: one line, first page": "/lists/parked?key=hot&limit=50",
            "parked: one line, 40,000 in": f"/lists/parked?key=hot&limit=50&cursor="
                                           f"{deep['cursor']}",
            "execution keys": "/lists/execution_keys?limit=50",
            "buried, first page": "/lists/buried?limit=50",
            "buried, 5,000 in": "/lists/buried?limit=50&cursor="
                                + urllib.parse.quote(buried_deep["cursor"]),
            "buried by task": f"/lists/buried?limit=50&task={TASKS[2]}",
            "buried by task and error (one filtered after)":
                f"/lists/buried?limit=50&task={TASKS[2]}&error=KeyError",
            "buried by queue, task and error":
                f"/lists/buried?limit=50&queue=q1&task={TASKS[2]}&error=KeyError",
            "buried facets": "/buried/facets",
            "one job, 40,000th in its line": "/jobs/p80001",
        }
        print(f"| page ({PARKED:,} parked, {BURIED:,} buried) | median ms | max ms | rows |")
        print("|---|---|---|---|")
        for name, path in pages.items():
            median, worst, body = timed(base + path)
            rows = len(body["items"]) if "items" in body else "-"
            print(f"| {name} | {median:.1f} | {worst:.1f} | {rows} |")
        http.shutdown()
        app.close()


if __name__ == "__main__":
    main()
