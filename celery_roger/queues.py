"""Which queues one worker consumes while some are paused.

The paused set lives in Redis. A worker applies it before it consumes anything (the
consumer bootstep), on every broadcast (``roger_pause``/``roger_resume``, control.py), and
on every healer tick (so a worker that missed a broadcast converges within about a
second). It stops consuming a paused queue only if it consumed it before, and consumes it
again on resume only then.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from redis.exceptions import RedisError

from .runtime import runtime

logger = logging.getLogger("celery_roger")


class QueueControl:
    """The queues one worker consumes, given the cluster's paused set."""

    def __init__(self, consumer: Any, app: Celery) -> None:
        self.consumer = consumer
        self.app = app
        self.original: set[str] | None = None  # what the worker consumed at start
        self.paused_here: set[str] = set()  # queues it stopped consuming for a pause
        self.applied: frozenset[str] | None = None

    def start(self) -> None:
        """Before the worker consumes: record its queues, stop consuming paused ones."""
        if self.original is None:
            self.original = {q.name for q in self.consumer.task_consumer.queues}
        try:
            paused = set(runtime(self.app).store.paused())
        except RedisError as exc:
            logger.error("roger: cannot read the paused queues (%s); jobs of paused queues "
                         "are held when delivered, and this is retried every second", exc)
            return
        self.apply(paused)

    def apply(self, paused: set[str] | frozenset[str]) -> None:
        """In the consumer's thread: consume according to ``paused``."""
        if self.original is None:
            return
        for queue in sorted((self.original & set(paused)) - self.paused_here):
            self.consumer.cancel_task_queue(queue)
            self.paused_here.add(queue)
            logger.info("roger: queue %r is paused: not consuming it", queue)
        for queue in sorted(self.paused_here - set(paused)):
            self.consumer.add_task_queue(queue)
            self.paused_here.discard(queue)
            logger.info("roger: queue %r resumed", queue)
        self.applied = frozenset(paused)

    def converge(self, paused: set[str]) -> None:
        """From any thread: converge to the stored paused set."""
        if self.applied is None or frozenset(paused) != self.applied:
            self.consumer.call_soon(self.apply, frozenset(paused))

    def change(self, queue: str, paused: bool) -> None:
        current = set(self.applied or ())
        if paused:
            current.add(queue)
        else:
            current.discard(queue)
        self.apply(current)
