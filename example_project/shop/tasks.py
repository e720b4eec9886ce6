"""The shop's jobs, each using a roger feature for a reason."""

from __future__ import annotations

import time

from celery_roger import RogerTask

from .callbacks import AUDIT_KEY, _redis
from .celery_app import app


@app.task(base=RogerTask, execution_key=lambda account_id, *a, **kw: f"account:{account_id}")
def sync_account(account_id: int, seconds: float = 0.4) -> str:
    """Pull an account from the CRM. Two syncs of one account must never overlap (they
    would write the same rows), but different accounts sync in parallel: an execution
    key per account. A second sync waits its turn without holding a worker."""
    time.sleep(seconds)
    return f"account {account_id} synced"


@app.task(base=RogerTask, queue_key=lambda feed_id: f"feed:{feed_id}",
          on_duplicate="existing")
def refresh_feed(feed_id: int) -> str:
    """Webhooks fire in bursts; one pending refresh per feed is enough: a queue key.
    ``on_duplicate="existing"`` hands callers the pending job instead of an error."""
    time.sleep(0.5)
    return f"feed {feed_id} refreshed"


class PaymentProviderDown(ConnectionError):
    pass


@app.task(base=RogerTask, retryable=True, max_execution_time=10)
def charge_card(order_id: int, failures: int = 0) -> str:
    """A flaky payment provider: retried along roger_retry_levels; after the last level
    the job is buried, where an operator can look at it and requeue it."""
    attempt = _redis.incr(f"{AUDIT_KEY}:charge:{order_id}")  # attempts, across processes
    if failures < 0 or attempt <= failures:
        raise PaymentProviderDown(f"provider timed out charging order {order_id}")
    return f"order {order_id} charged"


@app.task(base=RogerTask, bind=True)
def export_report(self, rows: int) -> str:
    """A long export that an operator may cancel when it runs away."""
    for _ in range(rows):
        time.sleep(0.01)
        if self.is_cancelled():  # only needed on pools that cannot kill (threads, solo)
            return "stopped"
    return f"{rows} rows exported"


@app.task(base=RogerTask, queue="emails")
def send_email(to: str) -> str:
    """Mail goes through its own queue, which operators pause during a provider outage."""
    time.sleep(0.05)
    return f"mail sent to {to}"
