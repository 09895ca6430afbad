"""A FIFO queue served by one thread: the backends are not thread-safe, so one generation runs at a time."""

from __future__ import annotations

import math
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from .jobs import RunControl


class QueueFull(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class Cancelled(Exception):
    """The client went away before its job started."""


@dataclass
class Task:
    run: Callable[[RunControl], Any]
    control: RunControl
    future: Future = field(default_factory=Future)


class Worker:
    """Runs submitted tasks in order on its own thread; at most ``max_waiting`` wait behind the running one."""

    def __init__(self, max_waiting: int, on_exit: Callable[[], None] | None = None) -> None:
        self.max_waiting, self._on_exit = max_waiting, on_exit
        self._queue: queue.Queue[Task | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self._seconds = 1.0  # a running average of task time, for Retry-After
        self.current: Task | None = None
        self._thread = threading.Thread(target=self._loop, name="mlx-stablefused-worker", daemon=True)
        self._thread.start()

    def submit(self, run: Callable[[RunControl], Any], control: RunControl) -> Task:
        with self._lock:
            if self._waiting >= self.max_waiting:
                raise QueueFull(max(1, math.ceil(self._seconds * (self._waiting + 1))))
            self._waiting += 1
        task = Task(run, control)
        self._queue.put(task)
        return task

    @property
    def waiting(self) -> int:
        return self._waiting

    def interrupt(self) -> bool:
        """Stop the running task after its current step; True when one was running."""
        task = self.current
        if task is not None:
            task.control.interrupt()
        return task is not None

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        try:
            self._serve()
        finally:
            if self._on_exit is not None:
                self._on_exit()

    def _serve(self) -> None:
        while (task := self._queue.get()) is not None:
            with self._lock:
                self._waiting -= 1
            if task.control.cancelled:
                task.future.set_exception(Cancelled())
                continue
            self.current = task
            start = time.monotonic()
            task.control.begin()
            try:
                task.future.set_result(task.run(task.control))
            except BaseException as e:  # that request fails alone; the worker keeps serving
                task.future.set_exception(e)
            finally:
                self.current = None
                self._seconds = 0.7 * self._seconds + 0.3 * (time.monotonic() - start)
