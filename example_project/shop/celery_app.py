"""The Celery app: broker, results and roger state in one Redis (``REDIS_URL``)."""

from __future__ import annotations

import os

from celery import Celery

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")

app = Celery("shop", broker=REDIS_URL, backend=REDIS_URL, include=["shop.tasks"])
app.conf.update(
    task_default_queue="default",
    roger_partition=os.environ.get("SHOP_PARTITION", "shop"),
    roger_callbacks="shop.callbacks.Audit",
    # Short delays so the demo sees a whole retry sequence; production keeps Roger's
    # default (1, 3, 5, ... 1800 s).
    roger_retry_levels=[0.5, 1.0],
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    result_expires=3600,
)
