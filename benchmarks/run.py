"""celery-roger benchmarks against plain Celery and the add-ons people use today.

    .venv/bin/python benchmarks/run.py [--quick] [--json results.json]

Every comparison runs side by side in the same run, alternating, several rounds; the
table shows the median and the spread (min..max) and ratios to plain Celery. Uses a
private redis-server (broker, results and roger state) and real prefork workers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def spread(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": values}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer jobs and rounds")
    parser.add_argument("--json", default=str(HERE / "results.json"))
    parser.add_argument("--only", choices=["publish", "throughput", "handoff", "commands"],
                        help="run one part")
    parser.add_argument("--broker", help="Celery's broker, e.g. amqp://guest:guest@127.0.0.1"
                        ":5672// (results and roger state stay in the private Redis)")
    opts = parser.parse_args()
    rounds = 3 if opts.quick else 5
    n_publish = 1000 if opts.quick else 2000
    n_jobs = 2000 if opts.quick else 5000

    from celery_roger.testing import RedisServer, WorkerProcess

    with RedisServer() as server:
        os.environ["BENCH_REDIS_URL"] = server.url
        if opts.broker:
            os.environ["BENCH_BROKER_URL"] = opts.broker
        import bench_app as b

        r = b.r
        results: dict = {"machine": {"python": platform.python_version(),
                                     "cpus": os.cpu_count(), "platform": platform.platform()}}

        def part(name: str) -> bool:
            if opts.broker and opts.only is None:  # another broker: publish and throughput
                return name in ("publish", "throughput")
            return opts.only in (None, name)

        def drop_queue(name: str, purge: bool = False) -> None:
            if opts.broker:
                with b.app.connection_for_write() as conn:
                    channel = conn.default_channel
                    with contextlib.suppress(*conn.channel_errors):  # not declared (yet)
                        channel.queue_purge(name) if purge else channel.queue_delete(name)
            r.delete(name)

        # -- publish cost -------------------------------------------------------------
        variants = {
            "plain Celery": lambda i: b.plain.delay(),
            "RogerTask, no key": lambda i: b.roger_nokey.delay(),
            "RogerTask, queue key": lambda i: b.roger_qk.delay(n=i),
            "RogerTask, queue key, long road": lambda i: b.roger_qk_long_road.delay(n=i),
            "celery-once QueueOnce": lambda i: b.once.delay(n=i),
            "celery-singleton Singleton": lambda i: b.singleton.delay(n=i),
        }
        rates: dict[str, list[float]] = {k: [] for k in variants if part("publish")}
        for k, fn in enumerate(variants.values()):  # warm up connections and scripts
            fn(10_000_000 + k)
        for rnd in range(rounds if part("publish") else 0):
            for name, fn in variants.items():
                offset = (rnd + 1) * 1_000_000 + list(variants).index(name) * 100_000
                start = time.perf_counter()
                for i in range(n_publish):
                    fn(offset + i)
                rates[name].append(n_publish / (time.perf_counter() - start))
                drop_queue("bench", purge=True)
        results["publish"] = {k: spread(v) for k, v in rates.items()}
        r.flushdb()

        # -- worker throughput ---------------------------------------------------------
        env = {"BENCH_REDIS_URL": server.url, "PYTHONPATH": str(HERE),
               **({"BENCH_BROKER_URL": opts.broker} if opts.broker else {})}
        kinds = {"plain Celery": b.plain, "plain Celery, acks_late=True": b.plain_late,
                 "RogerTask, no key": b.roger_nokey,
                 "RogerTask, distinct execution keys": b.roger_ek}
        throughput: dict[str, list[float]] = {k: [] for k in kinds if part("throughput")}
        for _ in range(max(2, rounds - 2) if part("throughput") else 0):
            for name, task in kinds.items():
                queue = f"tp-{uuid.uuid4().hex[:6]}"
                counter = f"count:{queue}"
                for i in range(n_jobs):
                    task.apply_async(kwargs={"counter": counter, **({"n": i} if task is
                                                                      b.roger_ek else {})},
                                     queue=queue)
                worker = WorkerProcess("bench_app", concurrency=2, queues=[queue], env=env,
                                       cwd=str(HERE)).start()
                try:
                    while not r.get(counter):
                        time.sleep(0.002)
                    start = time.perf_counter()
                    deadline = time.monotonic() + 300
                    while int(r.get(counter) or 0) < n_jobs:
                        if time.monotonic() > deadline:
                            raise SystemExit(f"{name}: jobs did not finish")
                        time.sleep(0.005)
                    throughput[name].append((n_jobs - 1) / (time.perf_counter() - start))
                finally:
                    worker.stop()
                    drop_queue(queue)
        results["throughput"] = {k: spread(v) for k, v in throughput.items()}

        # -- one hot execution key: hand-off latency --------------------------------------
        handoff: dict[str, list[float]] = {}
        for name, task in (("roger execution key", b.hot),
                           ("lock + retry(countdown=0.05)", b.hot_workaround)):
            if not part("handoff"):
                break
            run = uuid.uuid4().hex[:6]
            queue = f"hot-{run}"
            worker = WorkerProcess("bench_app", concurrency=4, queues=[queue], env=env,
                                   cwd=str(HERE)).start()
            try:
                for i in range(200):
                    task.apply_async((run, i), queue=queue)
                deadline = time.monotonic() + 300
                while r.llen(f"hot:{run}") < 400:
                    if time.monotonic() > deadline:
                        raise SystemExit(f"{name}: hot jobs did not finish")
                    time.sleep(0.02)
            finally:
                worker.stop()
            marks = sorted((float(t), kind) for kind, _, t in
                           (e.decode().split() for e in r.lrange(f"hot:{run}", 0, -1)))
            gaps, last_end, overlap = [], None, 0
            running = 0
            for t, kind in marks:
                if kind == "s":
                    running += 1
                    overlap = max(overlap, running)
                    if last_end is not None:
                        gaps.append((t - last_end) * 1000)
                else:
                    running -= 1
                    last_end = t
            gaps.sort()
            handoff[name] = {"p50_ms": statistics.median(gaps),
                             "p99_ms": gaps[int(len(gaps) * 0.99) - 1],
                             "max_concurrent": overlap}
        results["handoff"] = handoff

        # -- Redis commands per job --------------------------------------------------------
        def calls():
            return {k: v["calls"] for k, v in r.info("commandstats").items()}

        def diff(before, after):
            return {k.replace("cmdstat_", ""): after[k] - before.get(k, 0) for k in after
                    if after[k] - before.get(k, 0)}

        n = 2000 if part("commands") else 0
        before = calls()
        for i in range(n):
            b.roger_qk.delay(n=20_000_000 + i)
        pub = diff(before, calls())
        queue = f"cmd-{uuid.uuid4().hex[:6]}"
        counter = f"count:{queue}"
        for i in range(n):
            b.roger_ek.apply_async(kwargs={"counter": counter, "n": i}, queue=queue)
        before = calls()
        started = time.monotonic()
        worker = WorkerProcess("bench_app", concurrency=2, queues=[queue], env=env,
                               cwd=str(HERE)).start() if n else None
        try:
            while n and int(r.get(counter) or 0) < n:
                time.sleep(0.01)
            run_cmds = diff(before, calls())
            alive = time.monotonic() - started
        finally:
            if worker is not None:
                worker.stop()
        scripts = run_cmds.get("evalsha", 0) + run_cmds.get("eval", 0)
        results["redis_commands"] = {} if not n else {
            "publish with a queue key: script calls (round trips) per job":
                (pub.get("evalsha", 0) + pub.get("eval", 0)) / max(n, 1),
            "run with an execution key: script calls (round trips) per job, without the "
            f"~{alive:.0f} lease ticks": round((scripts - alive) / max(n, 1), 2),
            "run: every command per job (Lua-internal ones included; the counter INCR "
            "and GET are the benchmark's)": {k: round(v / max(n, 1), 2)
                                              for k, v in run_cmds.items()},
        }

    Path(opts.json).write_text(json.dumps(results, indent=2))
    print_table(results)
    print(f"\nJSON: {opts.json}")
    return 0


def print_table(res: dict) -> None:
    if res["publish"]:
        print_publish(res)
    if res["throughput"]:
        print_throughput(res)
    if res["handoff"]:
        print_rest(res, "handoff")
    if res["redis_commands"]:
        print_rest(res, "commands")


def print_publish(res: dict) -> None:
    pub = res["publish"]
    base = pub["plain Celery"]["median"]
    print("\nPublish (jobs/s, higher is better)")
    print(f"  {'variant':34} {'median':>8} {'min..max':>17} {'cost vs plain':>14}")
    for name, s in pub.items():
        print(f"  {name:34} {s['median']:8.0f} {s['min']:8.0f}..{s['max']:<8.0f} "
              f"{base / s['median']:13.2f}x")


def print_throughput(res: dict) -> None:
    tp = res["throughput"]
    base = tp["plain Celery"]["median"]
    print("\nWorker throughput, prefork -c 2 (jobs/s, higher is better)")
    print(f"  {'variant':34} {'median':>8} {'min..max':>17} {'vs plain':>9}")
    for name, s in tp.items():
        print(f"  {name:34} {s['median']:8.0f} {s['min']:8.0f}..{s['max']:<8.0f} "
              f"{s['median'] / base:8.2f}x")


def print_rest(res: dict, which: str) -> None:
    if which == "commands":
        print("\nRedis commands per job")
        for k, v in res["redis_commands"].items():
            print(f"  {k}: {v}")
        return
    print("\nOne hot execution key, 200 jobs of 10 ms, -c 4: end of one job -> start of next")
    for name, h in res["handoff"].items():
        print(f"  {name:34} p50 {h['p50_ms']:7.1f} ms   p99 {h['p99_ms']:7.1f} ms   "
              f"max running at once {h['max_concurrent']}")


if __name__ == "__main__":
    raise SystemExit(main())
