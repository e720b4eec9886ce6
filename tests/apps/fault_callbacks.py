"""roger_callbacks for the fault tests: the Recorder, with an ``on_cancel`` that is slow or
raises as ``ROGER_TEST_ON_CANCEL`` says (``sleepS``: sleeps S seconds; ``exit``: raises
SystemExit)."""

from __future__ import annotations

import os
import time

from roger_app import Recorder


class Faulty(Recorder):
    def on_cancel(self, partition, job):
        super().on_cancel(partition, job)
        how = os.environ.get("ROGER_TEST_ON_CANCEL", "")
        if how.startswith("sleep"):
            time.sleep(float(how[len("sleep"):]))
        elif how == "exit":
            raise SystemExit(3)
