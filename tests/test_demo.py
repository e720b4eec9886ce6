"""The README's demo command runs to the end against a real Redis and worker."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parents[1] / "example_project" / "demo.py"


def test_the_demo_runs_every_step(redis_url):
    proc = subprocess.run([sys.executable, str(DEMO)], env={**os.environ,
                          "REDIS_URL": redis_url}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for step in range(1, 8):
        assert f"{step}/7" in out
    assert "1 job, the other four calls got that same pending job back" in out
    assert "0 sent in 1.5 s" in out and "resumed: all 3 sent" in out
    assert "parked: execution key 'account:9' is held by job" in out
    assert out.rstrip().endswith("stopping it and Redis.")
