"""Jobs by the task id their client chose (A1111's ``force_task_id``): their own progress (A1111's
``/internal/progress``, what its web page polls) and a cancel that touches that job alone."""

from __future__ import annotations

import threading
from collections import OrderedDict

from .jobs import RunControl

KEEP_FINISHED = 256  # finished ids remembered, so a late poll still reads "completed"


class TaskRegistry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: OrderedDict[str, RunControl] = OrderedDict()  # in submission order
        self._finished: OrderedDict[str, None] = OrderedDict()

    def add(self, task_id: str | None, control: RunControl) -> None:
        if task_id is None:
            return
        with self._lock:
            self._live[task_id] = control

    def finish(self, task_id: str | None) -> None:
        if task_id is None:
            return
        with self._lock:
            self._live.pop(task_id, None)
            self._finished[task_id] = None
            while len(self._finished) > KEEP_FINISHED:
                self._finished.popitem(last=False)

    def cancel(self, task_id: str) -> bool:
        """Stop that job after its current step, or, still waiting, let it return at once with nothing."""
        with self._lock:
            control = self._live.get(task_id)
        if control is not None:
            control.interrupt()
        return control is not None

    def state(self, task_id: str) -> tuple[RunControl | None, int, bool]:
        """(its control or None, how many waiting jobs with ids are ahead of it, whether it has finished)."""
        with self._lock:
            control = self._live.get(task_id)
            ahead = 0
            for other_id, other in self._live.items():
                if other_id == task_id:
                    break
                ahead += other.started is None
            return control, ahead, task_id in self._finished
