"""Progress bars that suit where they are shown.

A terminal gets tqdm bars (nested ones stacked below the outer); a notebook gets tqdm's widgets; a log
file or a pipe (no TTY) gets plain lines from the outermost bar only, a few per run with the count,
the rate and the time left, instead of carriage returns and escape codes.
"""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator, Protocol

PLAIN_EVERY_S = 10.0  # a plain line at most this often (and at 25/50/75/100 %)
_open = threading.local()  # bars open in this thread: plain mode speaks for the outermost only


class Bar(Protocol):
    def update(self, n: int = 1) -> None: ...


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    try:
        return shell is not None and type(shell.get_ipython()).__name__ == "ZMQInteractiveShell"
    except Exception:
        return False


def _is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class _Silent:
    def update(self, n: int = 1) -> None:
        pass


class PlainLines:
    """``desc: 12/40 (30%), 1.8 it/s, 16 s left`` on stderr, at quarter marks and at most every 10 s."""

    def __init__(self, total: int, desc: str, unit: str) -> None:
        self.total, self.desc, self.unit = max(int(total), 0), desc, unit
        self.done, self.start = 0, time.monotonic()
        self.last_line, self.last_mark = self.start, 0

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        mark = 4 * self.done // self.total if self.total else 4
        if mark > self.last_mark or now - self.last_line >= PLAIN_EVERY_S:
            self.last_mark, self.last_line = mark, now
            print(self.line(now), file=sys.stderr, flush=True)

    def line(self, now: float) -> str:
        elapsed = now - self.start
        text = f"{self.desc}: {self.done}/{self.total} {self.unit}"
        if self.total:
            text += f" ({100 * self.done // self.total}%)"
        if elapsed > 0 and self.done:
            rate = self.done / elapsed
            text += f", {rate:.2f} {self.unit}/s" if rate >= 0.1 else f", {1 / rate:.1f} s/{self.unit}"
            if self.done < self.total:
                text += f", {(self.total - self.done) / rate:.0f} s left"
            else:
                text += f", {elapsed:.1f} s"
        return text


@contextmanager
def progress_bar(total: int, desc: str, enabled: bool = True, unit: str = "it") -> Iterator[Bar]:
    """A bar for ``total`` units of work; ``enabled=False`` (a pipeline's ``progress=False``) shows nothing."""
    depth = getattr(_open, "depth", 0)
    outer = depth == 0
    _open.depth = depth + 1
    try:
        if not enabled:
            yield _Silent()
        elif _in_notebook() or _is_terminal():
            from tqdm.auto import tqdm

            with tqdm(total=total, desc=desc, unit=unit, leave=outer, position=depth,
                      dynamic_ncols=True) as bar:
                yield bar
        elif outer:
            yield PlainLines(total, desc, unit)
        else:
            yield _Silent()
    finally:
        _open.depth = depth
