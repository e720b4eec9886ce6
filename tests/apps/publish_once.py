"""One publisher process of the concurrency test: publish square(run, n) at a given time."""

import json
import sys
import time

from roger_app import square

from celery_roger import DuplicateJob

run, n, start_at = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
time.sleep(max(0.0, start_at - time.time()))
try:
    result = square.delay(run, n)
    print(json.dumps({"published": result.id}))
except DuplicateJob as exc:
    print(json.dumps({"duplicate": exc.existing_id}))
