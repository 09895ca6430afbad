"""Sliding context windows over frames: longer videos than a motion module's maximum.

At every step the UNet sees overlapping windows of ``length`` frames; each frame's prediction is
the weighted mean over the windows that contain it (pyramid weights favour window centres), as
AnimateDiff-Evolved's uniform context scheduling does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ContextWindows:
    length: int = 16
    stride: int = 4
    weighting: str = "pyramid"  # or "flat"

    def __post_init__(self) -> None:
        if self.length < 1 or self.stride < 1:
            raise ValueError(f"context length and stride must be positive, got {self.length}, {self.stride}")
        if self.stride > self.length:
            raise ValueError(f"context stride {self.stride} exceeds the window length {self.length}: frames would be "
                             "skipped")
        if self.weighting not in ("pyramid", "flat"):
            raise ValueError(f"unknown context weighting {self.weighting!r}; expected 'pyramid' or 'flat'")

    def windows(self, num_frames: int) -> list[tuple[int, int]]:
        """Half-open frame ranges covering ``num_frames``; the last one ends at the last frame."""
        if num_frames <= self.length:
            return [(0, num_frames)]
        spans = [(s, s + self.length) for s in range(0, num_frames - self.length + 1, self.stride)]
        if spans[-1][1] != num_frames:
            spans.append((num_frames - self.length, num_frames))
        return spans

    def weights(self, size: int) -> np.ndarray:
        if self.weighting == "flat":
            return np.ones(size, np.float32)
        return np.minimum(np.arange(1, size + 1), np.arange(size, 0, -1)).astype(np.float32)
