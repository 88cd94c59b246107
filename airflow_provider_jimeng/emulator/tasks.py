"""The Visual API's task table: what each submitted task will make, and when, on the emulator's clock.

A task's life is fixed when it is submitted: ``in_queue`` for the queue delay (and, with a limited
``visual_parallelism``, until a generation lane is free), ``generating`` for the emulator's latency
times its image count, then ``done``; ``expired`` once its lifetime (12 h) has passed.
States are computed from the clock at poll time, so nothing runs in the background and a test that
injects a clock moves a task along without sleeping.
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass

IN_QUEUE = "in_queue"
GENERATING = "generating"
DONE = "done"
NOT_FOUND = "not_found"
EXPIRED = "expired"


@dataclass
class VisualTask:
    """One submitted task; ``failure`` is the body code it ends with when it fails after being made."""

    task_id: str
    request_id: str
    prompt: str
    seed: int
    width: int
    height: int
    images: int
    submitted_at: float
    started_at: float
    done_at: float
    expires_at: float
    failure: str | None = None
    delivered: bool = False

    def state(self, now: float) -> str:
        if now >= self.expires_at:
            return EXPIRED
        if now < self.started_at:
            return IN_QUEUE
        if now < self.done_at:
            return GENERATING
        return DONE


def new_task_id() -> str:
    """A task id shaped like the service's (a long decimal string)."""
    return str(7_000_000_000_000_000_000 + secrets.randbelow(10**18))


class VisualTaskTable:
    """Thread-safe table of :class:`VisualTask` by id."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tasks: dict[str, VisualTask] = {}
        #: When each of the service's generation lanes is free again (``parallelism`` of them).
        self._lanes: list[float] = []

    def add(self, task: VisualTask) -> None:
        with self._lock:
            self._tasks[task.task_id] = task

    def start_at(self, ready_at: float, duration: float, parallelism: int | None) -> float:
        """When a task ready at ``ready_at`` starts generating, and book its lane for ``duration``.

        The service makes ``parallelism`` tasks at once, first come first served; the others wait
        ``in_queue`` (``None``: every task starts when ready).
        """
        if parallelism is None:
            return ready_at
        with self._lock:
            if len(self._lanes) != parallelism:
                self._lanes = [0.0] * parallelism
            lane = min(range(parallelism), key=self._lanes.__getitem__)
            started_at = max(ready_at, self._lanes[lane])
            self._lanes[lane] = started_at + duration
            return started_at

    def get(self, task_id: str) -> VisualTask | None:
        with self._lock:
            return self._tasks.get(task_id)

    def unfinished(self, now: float) -> int:
        """Tasks queued or generating at ``now`` (what the concurrency limit counts)."""
        with self._lock:
            return sum(task.state(now) in (IN_QUEUE, GENERATING) for task in self._tasks.values())

    def all(self) -> list[VisualTask]:
        with self._lock:
            return list(self._tasks.values())

    def clear(self) -> None:
        with self._lock:
            self._tasks.clear()
            self._lanes = []
