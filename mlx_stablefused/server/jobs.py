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
    task_id: str | None = None             # A1111's force_task_id: the client's name for this job
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


def first_frame(latents: Any) -> Any:
    """The first image's latent, (1, 4, h, w): a video's (B, 4, F, h, w) gives its first frame."""
    return latents[:1, :, 0] if latents.ndim == 5 else latents[:1]


def step_callback(control: RunControl, offset: int = 0, per_frame: bool = False) -> Any:
    """The pipelines' ``callback_on_step_end``: progress and the step's linear latent-to-RGB preview into
    ``control``, and its interrupt flag into the pipeline. ``offset``: steps already done by an earlier pass;
    ``per_frame``: each restart of the step count is the next image (frames rendered one after another)."""
    from ..previews import latents_to_rgb

    frames = [-1]

    def on_step(p: Any, step: int, timestep: Any, tensors: dict) -> None:
        if per_frame and step == 0:
            frames[0] += 1
            control.image_started(frames[0])
        latents = tensors["latents"]  # the public layout (B, 4, h, w) or (B, 4, F, h, w)
        preview = latents_to_rgb(first_frame(latents))[0] if latents.shape[1] == 4 else None
        control.step_done(offset + step + 1, preview)
        if control.interrupted:
            p.interrupt()

    return on_step
