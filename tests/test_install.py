"""A bare ``pip install celery-roger`` runs a worker and a publisher, on Redis and on RabbitMQ.

Issue 15: a plain install failed at ``celery -A proj worker`` on a Redis broker with
``ModuleNotFoundError: No module named 'packaging'`` (kombu 5.7's Redis transport needs the
``kombu[redis]`` extra). Here a fresh venv (shared by both broker cases) gets this project
alone, from a copy of its tree (``pip install <dir>``: not editable, no extras, no test
dependencies; the copy keeps the build's ``build/`` and ``*.egg-info`` out of the working
tree), with packages from the machine's configured pip index. That venv's python publishes
a ``RogerTask`` job with a queue key (a second publish of the key is refused), that venv's
``celery -A install_app worker`` runs it, and its python reads the result: SUCCESS.

When pip cannot reach a package index, or RabbitMQ is not reachable (``ROGER_TEST_AMQP``,
default ``amqp://guest:guest@127.0.0.1:5672//``; empty leaves it out), the cases skip
saying why, and fail under CI (``CI=true``), like ``scripts/test``'s RabbitMQ tier.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import pytest
from kombu import Connection

from celery_roger.testing import RedisServer, WorkerProcess

ROOT = Path(__file__).resolve().parents[1]
APPS = ROOT / "tests" / "apps"
AMQP = os.environ.get("ROGER_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672//")
CI = os.environ.get("CI", "").lower() in ("true", "1")

#: What the copy of the tree leaves out: the VCS, venvs, caches and build outputs.
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv*", ".tox", "build", "dist", "*.egg-info", "__pycache__", ".mypy_cache",
    ".ruff_cache", ".pytest_cache", "test-output",
)

#: Room for a slow index on top of the two workers' runs (pytest-timeout counts the
#: module fixture's setup in the first test).
pytestmark = pytest.mark.timeout(420)


def unavailable(why: str) -> NoReturn:
    """Skip saying why; under CI the same is a failure."""
    if CI:
        pytest.fail(f"{why} (CI=true: this test may not be skipped)", pytrace=False)
    pytest.skip(why)


def bare_env(**extra: str) -> dict[str, str]:
    """The environment without this venv's import paths (pip's own settings stay)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    env.update(extra)
    return env


def run(cmd: Sequence[str | os.PathLike[str]], what: str, *, timeout: float,
        env: dict[str, str] | None = None, cwd: Path | None = None,
        ) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                          timeout=timeout, env=env or bare_env(), cwd=cwd)
    if proc.returncode != 0:
        pytest.fail(f"{what} failed ({proc.returncode}): {' '.join(map(str, cmd))}\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}", pytrace=False)
    return proc


def last_json(proc: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def bare_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with ``pip install <this project>`` and nothing else; made once."""
    root = tmp_path_factory.mktemp("bare-install")
    venv = root / "venv"
    run([sys.executable, "-m", "venv", venv], "python -m venv", timeout=120)
    python = venv / "bin" / "python"
    source = root / "celery-roger"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    cmd = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", str(source)]
    install = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=bare_env())
    if install.returncode != 0:
        # Could pip reach packages at all? setuptools>=68 is what the build needs first.
        probe = subprocess.run(
            [str(python), "-m", "pip", "download", "--disable-pip-version-check", "--no-deps",
             "-d", str(root / "probe"), "setuptools>=68"],
            capture_output=True, text=True, timeout=300, env=bare_env())
        if probe.returncode != 0:
            unavailable("pip cannot reach a package index (see `pip config list`): "
                        f"{(probe.stderr or probe.stdout).strip()[-1500:]}")
        pytest.fail(f"a bare `pip install celery-roger` failed ({install.returncode}): "
                    f"{' '.join(cmd)}\n{install.stdout[-3000:]}\n{install.stderr[-6000:]}",
                    pytrace=False)
    return venv


def amqp_reachable() -> str:
    if not AMQP:
        unavailable("RabbitMQ case left out (ROGER_TEST_AMQP is empty)")
    try:
        with Connection(AMQP, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:
        unavailable(f"RabbitMQ is not reachable at {AMQP}: {exc}")
    return AMQP


@pytest.fixture(params=["redis", "amqp"])
def broker(request: pytest.FixtureRequest, roger_redis: RedisServer) -> str:
    """Celery's broker: the tests' private redis-server, or RabbitMQ."""
    return roger_redis.url if request.param == "redis" else amqp_reachable()


def test_bare_install_runs_a_roger_job(bare_venv: Path, broker: str, roger_redis: RedisServer,
                                       tmp_path: Path) -> None:
    run_id = uuid.uuid4().hex[:10]
    env = bare_env(ROGER_INSTALL_BROKER=broker, ROGER_INSTALL_REDIS=roger_redis.url,
                   ROGER_INSTALL_RUN=run_id, PYTHONPATH=str(APPS))
    python = bare_venv / "bin" / "python"
    worker = WorkerProcess("install_app", concurrency=1, env=env, cwd=tmp_path,
                           log_dir=str(tmp_path))
    # The bare venv's own `celery` script, with the environment above and nothing else.
    assert worker.cmd[:3] == [sys.executable, "-m", "celery"], worker.cmd
    worker.cmd = [str(bare_venv / "bin" / "celery"), *worker.cmd[3:]]
    worker.env = env
    try:
        # Published before the worker starts: the second publish finds the key held.
        published = last_json(run([python, APPS / "install_app.py", "publish", run_id],
                                  "publish from the bare venv", timeout=60, env=env,
                                  cwd=tmp_path))
        assert Path(published["celery_roger"]).is_relative_to(bare_venv), published
        assert published["duplicate"] == {"queue_key": "double:21",
                                          "existing_id": published["id"]}, published
        worker.start(timeout=60)
        try:
            done = last_json(run([python, APPS / "install_app.py", "wait", published["id"]],
                                 "waiting for the job's result", timeout=90, env=env,
                                 cwd=tmp_path))
        except BaseException:
            print(f"worker log:\n{worker.log()[-6000:]}")
            raise
        assert done == {"state": "SUCCESS", "value": 42}, done
        assert " ready." in worker.log()
    finally:
        worker.stop()
        if not broker.startswith("redis"):
            with Connection(broker, connect_timeout=3) as conn:
                channel = conn.default_channel
                channel.queue_delete(f"roger-install-{run_id}")
                channel.exchange_delete(f"roger-install-{run_id}")
