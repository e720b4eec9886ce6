"""The app of tests/test_install.py, run by a fresh venv holding only ``pip install celery-roger``.

It imports nothing of the test suite: the worker runs it as ``celery -A install_app worker``;
``python install_app.py publish RUN`` publishes one job with a queue key (and checks that a
second publish of that key is refused); ``python install_app.py wait ID`` waits for the job's
result. Both print one JSON line. Configured from the environment:
ROGER_INSTALL_BROKER (Celery's broker), ROGER_INSTALL_REDIS (results and roger state),
ROGER_INSTALL_RUN (the run id: queue and partition).
"""

from __future__ import annotations

import json
import os
import sys

import celery
import kombu
from celery import Celery

import celery_roger
from celery_roger import DuplicateJob, RogerTask

RUN = os.environ["ROGER_INSTALL_RUN"]
REDIS = os.environ["ROGER_INSTALL_REDIS"]

app = Celery("install_app", broker=os.environ["ROGER_INSTALL_BROKER"], backend=REDIS)
app.conf.update(
    roger_redis_url=REDIS,
    roger_partition=f"install-{RUN}",
    task_default_queue=f"roger-install-{RUN}",
    broker_connection_retry_on_startup=True,
    broker_heartbeat=0,
    result_expires=600,
)


# Named: as ``python install_app.py`` the module is __main__.
@app.task(base=RogerTask, name="install_app.double", queue_key=lambda n: f"double:{n}")
def double(n: int) -> int:
    return 2 * n


def main(argv: list[str]) -> dict[str, object]:
    command, arg = argv
    if command == "publish":
        result = double.delay(21)
        try:
            double.delay(21)
        except DuplicateJob as exc:
            duplicate = {"queue_key": exc.queue_key, "existing_id": exc.existing_id}
        else:
            duplicate = None
        return {
            "id": result.id,
            "duplicate": duplicate,
            "celery_roger": celery_roger.__file__,
            "celery": celery.__version__,
            "kombu": kombu.__version__,
        }
    if command == "wait":
        result = app.AsyncResult(arg)
        value = result.get(timeout=float(os.environ.get("ROGER_INSTALL_TIMEOUT", "60")))
        return {"state": result.state, "value": value}
    raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])), flush=True)
