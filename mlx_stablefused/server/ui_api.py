"""The web UI: its page at ``/`` (static files, no build step, nothing from a CDN) and the jobs the A1111 API has
no endpoint for, under ``/ui/v1``: a guidance-scale sweep grid, prompt-interpolation, latent-walk and AnimateDiff
videos, and what the loaded model can do. They wait in the same queue, under the same limits and log line."""

from __future__ import annotations

import asyncio
import base64
import json
from importlib import resources
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .a1111 import Img2ImgRequest, Txt2ImgRequest, to_job
from .images import FieldError, png_bytes
from .infotext import VERSION, infotext
from .jobs import RunControl
from .media import (VIDEO_KINDS, VIDEO_MIME, SweepJob, VideoJob, encode_video, run_sweep, run_video, sweep_grid,
                    video_formats)
from .samplers import choose_sampler
from .service import Service, random_seed

STATIC = Path(str(resources.files(__package__) / "ui"))
STATIC_FILES = {"app.js": "text/javascript", "style.css": "text/css"}


class SweepRequest(Img2ImgRequest):
    """An A1111 txt2img body (img2img when ``init_images`` is given) plus the guidance scales to sweep."""

    init_images: list[str] = Field(default_factory=list)
    cfg_scales: list[float] = Field(min_length=1)

    @field_validator("cfg_scales")
    @classmethod
    def _finite(cls, values: list[float]) -> list[float]:
        if any(v != v or v in (float("inf"), float("-inf")) for v in values):
            raise ValueError("must be finite numbers")
        return values


class VideoRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str
    prompts: list[str] = Field(min_length=1)
    negative_prompt: str = ""
    seed: int = -1
    steps: int = Field(20, ge=1)
    cfg_scale: float = Field(7.0, allow_inf_nan=False)
    width: int = Field(512, ge=8)
    height: int = Field(512, ge=8)
    sampler_name: str | None = None
    scheduler: str | None = None
    frames: int = Field(8, ge=1)
    points: int = Field(3, ge=2)
    loop: bool = True
    same_noise: bool = True
    fps: int = Field(8, ge=1, le=60)
    format: str = "gif"
    force_task_id: str | None = Field(None, max_length=64)  # as A1111's: for /internal/progress, /ui/v1/cancel

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        return Txt2ImgRequest._multiple_of_8(v)


class TaskRequest(BaseModel):
    """A1111's /internal/progress body (``id_live_preview`` accepted; every preview is the latest)."""

    model_config = ConfigDict(extra="allow")
    id_task: str
    live_preview: bool = True


def to_video_job(req: VideoRequest) -> VideoJob:
    if req.kind not in VIDEO_KINDS:
        raise FieldError("kind", f"unknown video kind {req.kind!r}; expected one of {', '.join(VIDEO_KINDS)}")
    if req.format not in video_formats():
        raise FieldError("format", f"{req.format!r} is not served here; available: {', '.join(video_formats())}"
                         + ("" if "mp4" in video_formats() else " (MP4 and WebM need imageio-ffmpeg: the video extra)"))
    if req.kind == "interpolate" and len(req.prompts) < 2:
        raise FieldError("prompts", "interpolation needs at least two prompts")
    if req.kind != "interpolate" and len(req.prompts) != 1:
        raise FieldError("prompts", f"{req.kind} takes one prompt, got {len(req.prompts)}")
    return VideoJob(kind=req.kind, prompts=req.prompts, negative_prompt=req.negative_prompt,
                    seed=random_seed() if req.seed < 0 else req.seed, steps=req.steps, cfg_scale=req.cfg_scale,
                    width=req.width, height=req.height, sampler=choose_sampler(req.sampler_name, req.scheduler),
                    frames=req.frames, points=req.points, loop=req.loop, same_noise=req.same_noise, fps=req.fps,
                    format=req.format)


def video_infotext(job: VideoJob, model_name: str) -> str:
    """A1111-style parameters text for a video: the prompts, then the fields, the video's own included."""
    sampler = "DDIM (AnimateDiff's)" if job.kind == "animatediff" else job.sampler.label
    fields = {"Video": job.kind, "Frames": job.count, "FPS": job.fps, "Steps": job.steps, "Sampler": sampler,
              "CFG scale": job.cfg_scale, "Seed": job.seed, "Size": f"{job.width}x{job.height}", "Model": model_name}
    if job.kind == "latent_walk":
        fields.update({"Walk points": job.points, "Loop": job.loop})
    fields["Version"] = VERSION
    lines = [" -> ".join(job.prompts)]
    if job.negative_prompt:
        lines.append(f"Negative prompt: {job.negative_prompt}")
    lines.append(", ".join(f"{k}: {json.dumps(v) if isinstance(v, str) and ',' in v else v}" for k, v in fields.items()))
    return "\n".join(lines)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


async def save(service: Service, request: Request, name: str, files: dict[str, bytes]) -> None:
    """With ``--outputs``: each file written atomically under the request's name."""
    folder = service.settings.outputs
    if folder is None:
        return
    from ..checkpoint_io import atomic_path

    rid = getattr(request.state, "request_id", "ui")

    def write() -> None:
        for suffix, data in files.items():
            path = folder / f"{name}-{rid}-{suffix}"
            with atomic_path(path, suffix=path.suffix) as tmp:
                tmp.write_bytes(data)

    await asyncio.to_thread(write)


def capabilities(service: Service) -> dict:
    """What the page offers for the loaded model, and why not where it cannot."""
    engine, lim = service.engine, service.settings.limits
    walk, video = engine.walk_unavailable(), engine.video_unavailable()
    return {"model": engine.model_name, "label": engine.label(engine.model_name), "is_demo": engine.is_demo,
            "backend": service.settings.backend, "dtype": service.settings.dtype,
            "default_size": engine.default_size, "default_steps": engine.default_steps,
            "modes": {"txt2img": None, "img2img": None, "inpaint": None, "sweep": None, "interpolate": walk,
                      "latent_walk": walk, "animatediff": video},
            "video_formats": video_formats(),
            "limits": {"max_width": lim.max_width, "max_height": lim.max_height, "max_steps": lim.max_steps,
                       "max_batch": lim.max_batch, "max_frames": lim.max_frames}}


def router(service: Service) -> APIRouter:
    api = APIRouter()

    @api.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @api.get("/ui/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in STATIC_FILES:
            raise FieldError("name", f"no such file {name!r}", status=404)
        return FileResponse(STATIC / name, media_type=STATIC_FILES[name])

    @api.get("/ui/v1/capabilities")
    async def caps() -> dict:
        return capabilities(service)

    @api.post("/internal/progress")
    async def task_progress(req: TaskRequest) -> dict:
        return service.task_progress(req.id_task, req.live_preview)

    @api.post("/ui/v1/cancel")
    async def cancel(req: TaskRequest) -> dict:
        """Stop that job after its step (it returns what it has), or, still waiting, have it return at once
        with nothing; other jobs are untouched (A1111's /interrupt stops whichever job is running)."""
        return {"cancelled": service.tasks.cancel(req.id_task)}

    @api.post("/ui/v1/sweep")
    async def sweep(req: SweepRequest, request: Request) -> dict:
        job = SweepJob(to_job(req, img2img=bool(req.init_images)), req.cfg_scales)
        service.check_limits(job, "cfg_scales", service.settings.limits.max_frames)
        request.state.size = job.size
        control = RunControl(job.count, job.base.sampling_steps)
        cells = await service.run(lambda c: run_sweep(service.engine, job, c), control, request, req.force_task_id)
        model = service.engine.model_name
        texts = [infotext(job.base, job.base.seed, model, cfg_scale=s) for s in job.cfg_scales[:len(cells)]]
        labels = [f"CFG {s:g}" for s in job.cfg_scales[:len(cells)]]

        def encode() -> tuple[bytes, list[bytes]]:
            grid_text = infotext(job.base, job.base.seed, model,
                                 extra={"CFG scale sweep": ", ".join(f"{s:g}" for s in job.cfg_scales)})
            return png_bytes(sweep_grid(cells, labels), grid_text), [png_bytes(c, t) for c, t in zip(cells, texts)]

        grid, pngs = await asyncio.to_thread(encode) if cells else (b"", [])
        await save(service, request, f"{job.base.timestamp}-sweep",
                   {"grid.png": grid, **{f"{k}.png": p for k, p in enumerate(pngs)}} if cells else {})
        return {"grid": b64(grid) if cells else None, "images": [b64(p) for p in pngs], "infotexts": texts,
                "cfg_scales": job.cfg_scales[:len(cells)], "seed": job.base.seed, "interrupted": control.interrupted}

    @api.post("/ui/v1/video")
    async def video(req: VideoRequest, request: Request) -> dict:
        job = to_video_job(req)
        service.check_limits(job, "frames", service.settings.limits.max_frames)
        reason = capabilities(service)["modes"][job.kind]
        if reason is not None:
            raise FieldError("kind", reason)
        request.state.size = job.size
        steps = job.steps
        control = RunControl(1 if job.kind == "animatediff" else job.count, steps)
        frames = await service.run(lambda c: run_video(service.engine, job, c), control, request, req.force_task_id)
        if not frames:
            return {"video": None, "frames": [], "interrupted": True, "seed": job.seed}
        text = video_infotext(job, service.engine.model_name)

        def encode() -> tuple[bytes, list[bytes]]:
            return encode_video(frames, job.format, job.fps, text), [png_bytes(f, text) for f in frames]

        data, pngs = await asyncio.to_thread(encode)
        await save(service, request, f"{job.timestamp}-{job.kind}", {f"video.{job.format}": data})
        return {"video": b64(data), "mime": VIDEO_MIME[job.format], "format": job.format, "frames": [b64(p) for p in pngs],
                "parameters": text, "seed": job.seed, "interrupted": control.interrupted}

    return api
