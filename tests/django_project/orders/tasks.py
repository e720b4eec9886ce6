"""A roger task of the Django project: one pending shipment per order."""

import json
import time

import redis
from celery import shared_task
from django.conf import settings
from django.db import connection

from celery_roger import RogerTask

timeline = redis.Redis.from_url(settings.REDIS_URL)


@shared_task(base=RogerTask, bind=True,
             queue_key=lambda run, order_id, **kw: f"ship:{run}:{order_id}")
def ship(self, run: str, order_id: int, duration: float = 0.0) -> str | None:
    """Read the order its transaction wrote (None if it is not there), record it."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT name FROM orders_order WHERE id = %s", [order_id])
        row = cursor.fetchone()
    name = row[0] if row else None
    timeline.rpush(f"timeline:{run}", json.dumps({"event": "ship", "id": self.request.id,
                                                   "order": order_id, "name": name}))
    time.sleep(duration)
    return name
