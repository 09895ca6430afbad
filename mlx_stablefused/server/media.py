"""The web UI's jobs beyond one image: a guidance-scale sweep grid, prompt-interpolation and latent-walk videos,
AnimateDiff videos. Each runs on the engine's worker thread, as every generation does."""

from __future__ import annotations

import io
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..demo import DEMO_MODEL_ID, DEMO_MOTION_ADAPTER_ID
from .jobs import GenerationJob, RunControl, step_callback
from .samplers import SamplerChoice

VIDEO_KINDS = ("interpolate", "latent_walk", "animatediff")
VIDEO_MIME = {"gif": "image/gif", "mp4": "video/mp4", "webm": "video/webm"}


@dataclass
class SweepJob:
    """The same seed and prompt at each guidance scale: one cell per value, one grid."""

    base: GenerationJob
    cfg_scales: list[float]

    @property
    def width(self) -> int:
        return self.base.width

    @property
    def height(self) -> int:
        return self.base.height

    @property
    def steps(self) -> int:
        return self.base.steps

    @property
    def count(self) -> int:
        return len(self.cfg_scales)

    @property
    def size(self) -> str:
        return f"{self.base.width}x{self.base.height}x{self.count}"


@dataclass
class VideoJob:
    """``interpolate``: prompt to prompt, ``frames`` per pair; ``latent_walk``: one prompt, the starting noise
    walked (slerp) through ``points`` noises drawn from the seed, ``frames`` per leg, back to the first when
    ``loop``; ``animatediff``: ``frames`` frames from the motion module."""

    kind: str
    prompts: list[str]
    negative_prompt: str
    seed: int
    steps: int
    cfg_scale: float
    width: int
    height: int
    sampler: SamplerChoice
    frames: int = 8
    points: int = 3
    loop: bool = True
    same_noise: bool = True  # interpolate: one starting noise for every prompt (only the prompt moves)
    fps: int = 8
    format: str = "gif"
    timestamp: str = field(default_factory=lambda: time.strftime("%Y%m%d%H%M%S"))

    @property
    def legs(self) -> int:
        if self.kind == "interpolate":
            return len(self.prompts) - 1
        return self.points if self.loop else self.points - 1

    @property
    def count(self) -> int:
        """Frames in the video."""
        return self.frames if self.kind == "animatediff" else self.legs * self.frames + 1

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}x{self.count}"


# ------------------------------------------------------------------------------------------- running
def run_sweep(engine: Any, job: SweepJob, control: RunControl) -> list[Image.Image]:
    """One image per guidance scale, all from the job's seed."""
    base = job.base
    pipe = engine.pipes[base.mode]
    pipe.set_scheduler(base.sampler.ours, **base.sampler.overrides)
    image, mask = engine.prepare_inputs(base, pipe)
    control.preview_scale = pipe.vae_scale_factor
    cells = []
    for k, scale in enumerate(job.cfg_scales):
        if control.interrupted:
            break
        control.image_started(k)
        cells.append(engine.render(base, control, base.seed, image, mask, cfg_scale=scale))
    return cells


def initial_noise(pipe: Any, job: VideoJob) -> np.ndarray:
    """The starting noises, one per prompt (interpolate) or per walk point (back to the first when looping)."""
    from ..pipelines import inputs

    f = pipe.vae_scale_factor
    shape = (1, pipe.latent_channels, job.height // f, job.width // f)
    rng = inputs.make_rng(job.seed)
    if job.kind == "interpolate":
        count = 1 if job.same_noise else len(job.prompts)
        noise = inputs.random_latent((count, *shape[1:]), rng)
        return np.repeat(noise, len(job.prompts), axis=0) if job.same_noise else noise
    noise = inputs.random_latent((job.points, *shape[1:]), rng)
    return np.concatenate([noise, noise[:1]]) if job.loop else noise


def run_video(engine: Any, job: VideoJob, control: RunControl) -> list[Image.Image]:

    if control.interrupted:  # cancelled while it waited
        return []
    common = dict(num_inference_steps=job.steps, guidance_scale=job.cfg_scale, seed=job.seed,
                  negative_prompt=job.negative_prompt or None)
    if job.kind == "animatediff":
        pipe = engine.video_pipeline()
        control.preview_scale = pipe.vae_scale_factor
        return pipe(prompt=job.prompts[0], video_height=job.height, video_width=job.width, video_frames=job.frames,
                    callback_on_step_end=step_callback(control), **common)[0]
    pipe = engine.walk_pipeline()
    pipe.set_scheduler(job.sampler.ours, **job.sampler.overrides)
    control.preview_scale = pipe.vae_scale_factor
    noise = initial_noise(pipe, job)
    prompts = job.prompts if job.kind == "interpolate" else job.prompts[:1] * len(noise)
    return pipe.interpolate(prompt=prompts, latent=noise, interpolation_steps=job.frames, batch_size=1,
                            callback_on_step_end=step_callback(control, per_frame=True), **common)


# ------------------------------------------------------------------------------------------ encoding
def sweep_grid(cells: list[Image.Image], labels: list[str], columns: int = 4) -> Image.Image:
    """The cells in rows of ``columns``, each with its label in a strip beneath (A1111's X/Y plot, one axis)."""
    from ..utils.images import _load_font

    width, height = cells[0].size
    strip = max(12, min(32, width // 8))
    columns = min(columns, len(cells))
    rows = -(-len(cells) // columns)
    grid = Image.new("RGB", (columns * width, rows * (height + strip)), "white")
    draw = ImageDraw.Draw(grid)
    size = strip - 3  # one font for every label: the largest at which the widest fits its cell
    while size > 6 and max(draw.textlength(t, font=_load_font(None, size)) for t in labels) > width - 2:
        size -= 1
    font = _load_font(None, size)
    for k, (cell, label) in enumerate(zip(cells, labels)):
        x, y = (k % columns) * width, (k // columns) * (height + strip)
        grid.paste(cell, (x, y))
        text_width = draw.textlength(label, font=font)
        draw.text((x + (width - text_width) / 2, y + height + (strip - size) / 2 - 1), label, fill="black", font=font)
    return grid


def video_formats() -> list[str]:
    """GIF always (Pillow); MP4 and WebM where imageio-ffmpeg is installed (the ``video`` extra)."""
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        return ["gif"]
    return ["gif", "mp4", "webm"]


def encode_video(frames: list[Image.Image], fmt: str, fps: int, comment: str) -> bytes:
    """The frames as an animated GIF (``comment``: the parameters text) or an MP4 / WebM file's bytes."""
    if fmt == "gif":
        out = io.BytesIO()
        frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:], duration=max(1, round(1000 / fps)),
                       loop=0, comment=comment.encode("utf-8"))
        return out.getvalue()
    from ..utils.images import pil_to_video

    with tempfile.TemporaryDirectory() as folder:
        path = pil_to_video(frames, Path(folder) / f"video.{fmt}", fps=fps)
        return path.read_bytes()


def motion_adapter_for(model_id: str | None, configured: str | None) -> str | None:
    """The served motion adapter: the one configured, else the demo's for the demo model, else none."""
    if configured is not None:
        return configured
    return DEMO_MOTION_ADAPTER_ID if model_id == DEMO_MODEL_ID else None
