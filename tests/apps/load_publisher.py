"""A publisher process of the load and fault tests.

``python load_publisher.py SPEC_JSON`` publishes ``roger_app.<task>(run, name, how,
duration)`` once per job of the spec, each at its ``at`` time (epoch seconds) if given,
and prints one JSON line per publish: ``{"name", "ok": id}``, ``{"name", "duplicate":
existing id}`` or ``{"name", "error": "Class: message"}``, with the time it took.

SPEC: {"run": str, "task": str, "how": str, "duration": float,
       "jobs": [{"name": str, "qk": str|null, "ek": str|null, "at": float|null}, ...]}
"""

import json
import sys
import time

import roger_app

from celery_roger import DuplicateJob

spec = json.loads(sys.argv[1])
task = getattr(roger_app, spec.get("task", "fragile"))
for job in spec["jobs"]:
    if job.get("at"):
        time.sleep(max(0.0, job["at"] - time.time()))
    began = time.time()
    line = {"name": job["name"], "qk": job.get("qk"), "t": began}
    try:
        result = task.apply_async((spec["run"], job["name"], spec.get("how", "ok"),
                                   spec.get("duration", 0.0)),
                                  queue_key=job.get("qk"), execution_key=job.get("ek"))
        line["ok"] = result.id
    except DuplicateJob as exc:
        line["duplicate"] = exc.existing_id
    except Exception as exc:  # the test reads what a user would see
        line["error"] = f"{type(exc).__module__}.{type(exc).__name__}: {exc}"
    line["took"] = time.time() - began
    print(json.dumps(line), flush=True)
