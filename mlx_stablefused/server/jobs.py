"""What a generation request asks for, in one shape for both APIs, and how a running one is steered."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from .samplers import SamplerChoice

# A1111's inpainting_fill values: what the masked part starts from.
INPAINTING_FILLS = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}


@dataclass(frozen=True)
class HiresFix:
    """A1111's ``enable_hr``: the first image upscaled to ``width x height`` and denoised again."""

    width: int
    height: int
    upscaler: str          # A1111's name ("Latent", "Lanczos", ...)
    steps: int             # the second pass's schedule length
    denoising_strength: float
    scale: float

    @property
    def sampling_steps(self) -> int:
        return max(min(int(self.steps * self.denoising_strength), self.steps), 1)


@dataclass
class GenerationJob:
    """One request: ``batch_size * n_iter`` images, image k from seed ``seed + k`` (A1111's numbering)."""

    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    cfg_scale: float
    width: int
    height: int
    sampler: SamplerChoice
    batch_size: int = 1
    n_iter: int = 1
    init_image: Image.Image | None = None  # img2img / inpainting
    mask: Image.Image | None = None        # inpainting: white = repaint
    denoising_strength: float = 0.75
    mask_blur: int = 4
    inpainting_fill: int = 1
    inpainting_mask_invert: bool = False
    resize_mode: int = 0                   # img2img: A1111's 0-3 (see resize.RESIZE_MODES)
    hires: HiresFix | None = None          # txt2img: A1111's hires fix
    timestamp: str = field(default_factory=lambda: time.strftime("%Y%m%d%H%M%S"))

    @property
    def mode(self) -> str:
        return "txt2img" if self.init_image is None else "img2img" if self.mask is None else "inpaint"

    @property
    def masked_content(self) -> str:
        """The inpainting pipeline's ``masked_content`` for this fill (0 "fill" is prepared in pixels)."""
        return INPAINTING_FILLS[self.inpainting_fill] if self.inpainting_fill >= 2 else "original"

    @property
    def count(self) -> int:
        return self.batch_size * self.n_iter

    @property
    def sampling_steps(self) -> int:
        """Steps that actually run: image-to-image skips the first (1 - strength) of the schedule; the hires
        fix's second pass adds its own."""
        if self.init_image is None:
            return self.steps + (0 if self.hires is None else self.hires.sampling_steps)
        return max(min(int(self.steps * self.denoising_strength), self.steps), 1)

    @property
    def output_size(self) -> tuple[int, int]:
        return (self.width, self.height) if self.hires is None else (self.hires.width, self.hires.height)

    @property
    def size(self) -> str:
        width, height = self.output_size
        return f"{width}x{height}x{self.count}"


class RunControl:
    """Progress of one job, written by the worker thread, read by /progress; interrupt and cancel flags."""

    def __init__(self, images: int = 1, steps: int = 1) -> None:
        self.images, self.steps = images, max(steps, 1)
        self.image_index = self.step = 0
        self.started: float | None = None
        self.interrupted = self.cancelled = False
        self.preview: Any = None  # the current image's linear latent-to-RGB preview, (h, w, 3) in [0, 1]
        self.preview_scale = 8  # pixels per latent cell: the preview shown at the image's size
        self._lock = threading.Lock()

    def begin(self) -> None:
        self.started = time.monotonic()

    def image_started(self, index: int) -> None:
        with self._lock:
            self.image_index, self.step = index, 0

    def step_done(self, step: int, preview: Any = None) -> None:
        if preview is not None:
            self.preview = preview
        self.step = step

    def interrupt(self) -> None:
        self.interrupted = True

    def cancel(self) -> None:
        """The client went away: skip the job if it is still waiting, stop it after this step if running."""
        self.cancelled = self.interrupted = True

    def fraction(self) -> float:
        with self._lock:
            return min((self.image_index + min(self.step, self.steps) / self.steps) / self.images, 1.0)

    def eta(self) -> float:
        """Seconds left, extrapolated from the time so far (A1111's eta_relative)."""
        done = self.fraction()
        if self.started is None or done <= 0:
            return 0.0
        elapsed = time.monotonic() - self.started
        return max(elapsed / done - elapsed, 0.0)
