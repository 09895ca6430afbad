"""The server's state and the steps every generation request takes: limits, queue, wait, encode, save."""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
import uuid
from typing import Any

from fastapi import Request

from .engine import SEED_RANGE, Engine, GenerationResult, save_outputs
from .images import FieldError, png_bytes
from .infotext import info_json, infotext
from .jobs import GenerationJob, RunControl
from .settings import ServerSettings
from .tasks import TaskRegistry

POLL_S = 0.25  # how often a waiting request checks that its client is still there


def random_seed() -> int:
    return secrets.randbelow(SEED_RANGE)


class ClientGone(Exception):
    """The client disconnected while its request waited or ran."""


class Service:
    def __init__(self, settings: ServerSettings, engine: Engine) -> None:
        self.settings, self.engine = settings, engine
        self.worker = engine.worker
        self.tasks = TaskRegistry()

    # --------------------------------------------------------------------------------- limits
    def check_limits(self, job: Any, count_field: str = "batch_size", count_limit: int | None = None) -> None:
        """The configured ceilings (422 naming the field), before the job is queued; ``count_limit``: the
        ceiling of ``job.count`` when it is not the batch limit (frames of a video)."""
        lim = self.settings.limits
        count = "batch_size x n_iter" if count_field == "batch_size" else count_field
        checks = [("width", "width", job.width, lim.max_width), ("height", "height", job.height, lim.max_height),
                  ("steps", "steps", job.steps, lim.max_steps),
                  (count_field, count, job.count, lim.max_batch if count_limit is None else count_limit)]
        hires = getattr(job, "hires", None)
        if hires is not None:
            checks += [("hr_scale", "the hires width", hires.width, lim.max_width),
                       ("hr_scale", "the hires height", hires.height, lim.max_height),
                       ("hr_second_pass_steps", "hr_second_pass_steps", hires.steps, lim.max_steps)]
        for name, what, value, ceiling in checks:
            if value > ceiling:
                raise FieldError(name, f"{what} = {value} is over this server's limit of {ceiling}")

    # ------------------------------------------------------------------------------- running
    async def run(self, run: Any, control: RunControl, request: Request, task_id: str | None = None) -> Any:
        """Queue ``run`` (503 when full), wait for it; if the client goes, skip or stop its job. ``task_id``:
        the client's name for the job (A1111's ``force_task_id``), for its own progress and cancel."""
        task = self.worker.submit(run, control)
        self.tasks.add(task_id, control)
        future = asyncio.wrap_future(task.future)
        try:
            while True:
                done, _ = await asyncio.wait({future}, timeout=POLL_S)
                if done:
                    return future.result()
                if await request.is_disconnected():
                    control.cancel()
                    raise ClientGone()
        finally:
            self.tasks.finish(task_id)

    async def generate(self, job: GenerationJob, request: Request, count_field: str = "batch_size"
                       ) -> tuple[GenerationResult, list[str], list[bytes]]:
        self.check_limits(job, count_field)
        request.state.size = job.size
        control = RunControl(job.count, job.sampling_steps)
        result = await self.run(lambda c: self.engine.generate(job, c), control, request, job.task_id)
        model = self.engine.model_name
        texts = [infotext(job, seed, model) for seed in result.seeds]
        # Encoded off the event loop (PIL's zlib releases the GIL): /progress stays quick meanwhile.
        pngs = await asyncio.to_thread(lambda: [png_bytes(im, text) for im, text in zip(result.images, texts)])
        if self.settings.outputs is not None:
            rid = getattr(request.state, "request_id", uuid.uuid4().hex[:8])
            await asyncio.to_thread(save_outputs, self.settings.outputs, f"{job.timestamp}-{rid}", pngs,
                                    result.seeds)
        return result, texts, pngs

    async def a1111_generate(self, job: GenerationJob, request: Request) -> dict:
        """A1111's response: base64 PNGs, the request's parameters, and ``info`` as a JSON string."""
        result, texts, pngs = await self.generate(job, request)
        return {"images": [base64.b64encode(p).decode("ascii") for p in pngs],
                "parameters": _public_parameters(job),
                "info": info_json(job, result.seeds, texts, self.engine.model_name)}

    async def switch_model(self, name: str, request: Request) -> None:
        if name == self.engine.model_name:
            return
        if name not in self.engine.available_models():
            raise FieldError("sd_model_checkpoint", f"unknown model {name!r}; available: "
                                                    f"{', '.join(self.engine.available_models())}")
        await self.run(lambda c: self.engine.load(name), RunControl(), request)

    def task_progress(self, task_id: str, live_preview: bool = True) -> dict:
        """A1111's /internal/progress for one job: active, queued, completed, progress, eta, live_preview (a
        data URL); plus the step and image counts, and how many jobs wait ahead of it."""
        control, ahead, completed = self.tasks.state(task_id)
        active = control is not None and control.started is not None
        preview = _preview_png(control) if active and live_preview else None
        return {"active": active, "queued": control is not None and not active, "completed": completed,
                "progress": control.fraction() if active else (1.0 if completed else 0.0),
                "eta": control.eta() if active else None, "queue_ahead": ahead,
                "live_preview": None if preview is None else f"data:image/png;base64,{preview}",
                "id_live_preview": -1, "textinfo": "waiting" if control is not None and not active else None,
                "sampling_step": control.step if active else 0, "sampling_steps": control.steps if control else 0,
                "job_no": control.image_index if active else 0, "job_count": control.images if control else 0,
                "interrupted": bool(control and control.interrupted)}

    def progress(self, include_image: bool = True) -> dict:
        """A1111's /progress: progress 0-1, eta_relative (s), state, and ``current_image``: the running step's
        linear latent-to-RGB preview (AUTOMATIC1111's cheap approximation) as a base64 PNG at the image's size."""
        task = self.worker.current
        control = task.control if task is not None else None
        state = {"skipped": False, "interrupted": bool(control and control.interrupted),
                 "stopping_generation": False, "job": "" if control is None else "generation",
                 "job_count": 0 if control is None else control.images,
                 "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "job_no": 0 if control is None else control.image_index,
                 "sampling_step": 0 if control is None else control.step,
                 "sampling_steps": 0 if control is None else control.steps, "queued": self.worker.waiting}
        return {"progress": 0.0 if control is None else control.fraction(),
                "eta_relative": 0.0 if control is None else control.eta(), "state": state,
                "current_image": _preview_png(control) if include_image else None, "textinfo": None}


def _preview_png(control: Any) -> str | None:
    rgb = None if control is None else control.preview
    if rgb is None:
        return None
    import io

    from PIL import Image

    image = Image.fromarray((rgb * 255).round().astype("uint8"))
    image = image.resize((image.width * control.preview_scale, image.height * control.preview_scale), Image.NEAREST)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode("ascii")


def _public_parameters(job: GenerationJob) -> dict:
    """The request's parameters as A1111 echoes them (images left out)."""
    return {"prompt": job.prompt, "negative_prompt": job.negative_prompt, "seed": job.seed, "steps": job.steps,
            "cfg_scale": job.cfg_scale, "width": job.width, "height": job.height,
            "sampler_name": job.sampler.label, "scheduler": job.sampler.schedule, "batch_size": job.batch_size,
            "n_iter": job.n_iter, "denoising_strength": job.denoising_strength if job.init_image else None}
