"""The Celery app the benchmarks publish to and run (configured from the environment)."""

from __future__ import annotations

import os
import time

import redis
from celery import Celery
from celery_once import QueueOnce
from celery_singleton import Singleton

from celery_roger import RogerTask

URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/9")

#: BENCH_BROKER_URL: Celery's broker when it is not the private Redis (RabbitMQ figures).
BROKER = os.environ.get("BENCH_BROKER_URL") or URL
app = Celery("bench_app", broker=BROKER, backend=URL)
app.conf.update(
    roger_redis_url=URL,
    task_default_queue=os.environ.get("BENCH_QUEUE", "bench"),
    roger_partition="bench",
    # opt-in (README): the execution-key figures of docs/benchmarks.md are with it on
    roger_pipelined_admission=True,
    # BENCH_HISTORY_TTL=0: without jobs' histories (default: on, a day, as users get it)
    roger_history_ttl=float(os.environ.get("BENCH_HISTORY_TTL", 86400)),
    task_ignore_result=True,
    worker_prefetch_multiplier=4,
    broker_connection_retry_on_startup=True,
    ONCE={"backend": "celery_once.backends.Redis",
          "settings": {"url": URL, "default_timeout": 3600}},
    singleton_backend_url=URL,
)
if BROKER.startswith("amqp"):
    # "published" means "accepted by RabbitMQ" (README: Publish in one round trip).
    app.conf.broker_transport_options = {"confirm_publish": True}
r = redis.Redis.from_url(URL)

#: The same publisher without fused publish: take, publish, confirm (the long road).
long_road = Celery("bench_long_road", broker=BROKER, backend=URL)
long_road.conf.update(roger_redis_url=URL, roger_partition="bench", task_ignore_result=True,
                      roger_fused_publish=False,
                      task_default_queue=os.environ.get("BENCH_QUEUE", "bench"),
                      broker_transport_options=app.conf.broker_transport_options)


def done(counter: str) -> None:
    r.incr(counter)


@app.task
def plain(counter: str = "") -> None:
    if counter:
        done(counter)


@app.task(base=RogerTask)
def roger_nokey(counter: str = "") -> None:
    if counter:
        done(counter)


@app.task(base=RogerTask, queue_key=lambda counter="", n=0: f"q:{n}")
def roger_qk(counter: str = "", n: int = 0) -> None:
    if counter:
        done(counter)


@long_road.task(base=RogerTask,
                queue_key=lambda counter="", n=0: f"q:{n}")
def roger_qk_long_road(counter: str = "", n: int = 0) -> None:
    pass


@app.task(base=RogerTask, execution_key=lambda counter="", n=0: f"e:{n}")
def roger_ek(counter: str = "", n: int = 0) -> None:
    if counter:
        done(counter)


@app.task(base=QueueOnce, once={"graceful": True})
def once(counter: str = "", n: int = 0) -> None:
    pass


@app.task(base=Singleton)
def singleton(counter: str = "", n: int = 0) -> None:
    pass


@app.task(base=RogerTask, execution_key="hot")
def hot(run: str, i: int) -> None:
    """One job of a hot execution key: record its start and end."""
    r.rpush(f"hot:{run}", f"s {i} {time.time()}")
    time.sleep(0.01)
    r.rpush(f"hot:{run}", f"e {i} {time.time()}")


@app.task(bind=True, max_retries=None)
def hot_workaround(self, run: str, i: int) -> None:
    """What users write today: a Redis lock, and retry with a countdown while it is held."""
    if not r.set("workaround-lock", self.request.id, nx=True, ex=60):
        raise self.retry(countdown=0.05)
    try:
        r.rpush(f"hot:{run}", f"s {i} {time.time()}")
        time.sleep(0.01)
        r.rpush(f"hot:{run}", f"e {i} {time.time()}")
    finally:
        r.delete("workaround-lock")


@app.task(acks_late=True)
def plain_late(counter: str = "") -> None:
    """Plain Celery with late ack, as RogerTask has by default."""
    if counter:
        done(counter)


# -- limits (benchmarks/limits.py) ------------------------------------------------------------


def mark(run: str, kind: str) -> None:
    r.rpush(f"marks:{run}", f"{kind} {time.time()}")


@app.task(base=RogerTask, bind=True)
def rated(self, run: str, i: int) -> None:
    """Published with rate= and rate_key= per call: records its start, for its rate:
    when its worker admitted it (its body runs a few ms later, in a pool process)."""
    r.rpush(f"marks:{run}", f"s {getattr(self.request, 'roger_admitted_at', None) or time.time()}")


@app.task(rate_limit="10/s")
def celery_rated(run: str, i: int) -> None:
    """Celery's own rate_limit (per worker)."""
    mark(run, "s")


@app.task(base=RogerTask)
def slotted(run: str, i: int, duration: float = 0.05) -> None:
    """Published with execution_key= and execution_limit= per call."""
    mark(run, "s")
    time.sleep(duration)
    mark(run, "e")


@app.task(base=RogerTask)
def counted(counter: str = "", n: int = 0) -> None:
    """Published with each option per call, to count Redis round trips per job."""
    done(counter)
