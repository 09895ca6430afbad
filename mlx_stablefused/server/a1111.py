"""The AUTOMATIC1111 web API subset clients use (/sdapi/v1/...), with A1111's field names and shapes.

Fields A1111 has and this port does not use are accepted and ignored (``extra="allow"``; the README lists
them): a client that sends A1111's full payload, as webuiapi does, works unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..pipelines.lora_tags import LORA_SUFFIXES
from .images import FieldError, decode_image
from .jobs import GenerationJob, HiresFix
from .resize import hr_upscaler
from .samplers import choose_sampler, sampler_items, schedule_items
from .service import Service, random_seed

# The A1111 fields accepted and ignored (listed in the README): they change nothing here.
IGNORED_FIELDS = (
    "styles", "subseed", "subseed_strength", "seed_resize_from_h", "seed_resize_from_w", "restore_faces",
    "tiling", "do_not_save_samples", "do_not_save_grid", "eta", "s_min_uncond", "s_churn", "s_tmax", "s_tmin",
    "s_noise", "override_settings", "override_settings_restore_afterwards", "refiner_checkpoint",
    "refiner_switch_at", "disable_extra_networks", "comments", "firstphase_width", "firstphase_height",
    "hr_checkpoint_name", "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt",
    "script_name", "script_args", "send_images", "save_images", "alwayson_scripts", "infotext",
    "image_cfg_scale", "mask_round", "inpaint_full_res", "inpaint_full_res_padding",
    "initial_noise_multiplier", "latent_mask", "include_init_images", "mask_blur_x", "mask_blur_y",
)


class Txt2ImgRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = None  # A1111's older name for sampler_name
    scheduler: str | None = None
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    steps: int = Field(50, ge=1)
    cfg_scale: float = Field(7.0, allow_inf_nan=False)
    width: int = Field(512, ge=8)
    height: int = Field(512, ge=8)
    force_task_id: str | None = Field(None, max_length=64)  # for /internal/progress and /ui/v1/cancel
    denoising_strength: float | None = Field(None, ge=0.0, le=1.0)  # txt2img: the hires fix's strength
    enable_hr: bool = False
    hr_scale: float = Field(2.0, gt=0, allow_inf_nan=False)
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = Field(0, ge=0)
    hr_resize_x: int = Field(0, ge=0)
    hr_resize_y: int = Field(0, ge=0)

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"must be a multiple of 8 (the VAE's factor), got {v}")
        return v


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] = Field(min_length=1)
    mask: str | None = None
    denoising_strength: float = Field(0.75, ge=0.0, le=1.0)
    mask_blur: int = Field(4, ge=0, le=64)
    inpainting_fill: int = Field(0, ge=0, le=3)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    resize_mode: int = Field(0, ge=0, le=3)


class OptionsRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # other A1111 options are accepted and ignored
    sd_model_checkpoint: str | None = None


def to_job(req: Txt2ImgRequest, img2img: bool) -> GenerationJob:
    sampler = choose_sampler(req.sampler_name or req.sampler_index, req.scheduler)
    job = GenerationJob(prompt=req.prompt, negative_prompt=req.negative_prompt,
                        seed=random_seed() if req.seed < 0 else req.seed, steps=req.steps, cfg_scale=req.cfg_scale,
                        width=req.width, height=req.height, sampler=sampler, batch_size=req.batch_size,
                        n_iter=req.n_iter, task_id=req.force_task_id)
    if req.enable_hr and not img2img:
        job.hires = hires_fix(req)
    if img2img:
        assert isinstance(req, Img2ImgRequest)
        if req.mask is not None and req.resize_mode == 3:
            raise FieldError("resize_mode", "3 (latent upscale) does not apply to inpainting; use 0, 1 or 2")
        if int(req.steps * req.denoising_strength) < 1:
            raise FieldError("denoising_strength", f"{req.denoising_strength} x steps {req.steps} leaves no step "
                                                   "to run")
        job.init_image = decode_image(req.init_images[0], "init_images[0]")
        job.mask = None if req.mask is None else decode_image(req.mask, "mask")
        job.denoising_strength, job.mask_blur = req.denoising_strength, req.mask_blur
        job.inpainting_fill, job.inpainting_mask_invert = req.inpainting_fill, bool(req.inpainting_mask_invert)
        job.resize_mode = req.resize_mode
    return job


HR_DENOISING_STRENGTH = 0.7  # A1111's default for the hires fix


def hires_fix(req: Txt2ImgRequest) -> HiresFix:
    """A1111's target size: ``hr_resize_x`` / ``hr_resize_y`` when given (one of them: the other keeps the
    aspect ratio), else ``hr_scale`` times width and height; a multiple of 8 here (the VAE's factor)."""
    hr_upscaler(req.hr_upscaler)  # an unknown name refused before anything is queued
    x, y = req.hr_resize_x, req.hr_resize_y
    if x == 0 and y == 0:
        width, height, field = int(req.width * req.hr_scale), int(req.height * req.hr_scale), "hr_scale"
        scale = req.hr_scale
    else:
        width = x if x else y * req.width // req.height
        height = y if y else x * req.height // req.width
        field, scale = ("hr_resize_x" if x else "hr_resize_y"), width / req.width
    if width % 8 or height % 8 or width < 8 or height < 8:
        raise FieldError(field, f"gives a hires size of {width}x{height}; both must be multiples of 8")
    strength = HR_DENOISING_STRENGTH if req.denoising_strength is None else req.denoising_strength
    steps = req.hr_second_pass_steps or req.steps
    if int(steps * strength) < 1:
        raise FieldError("denoising_strength", f"{strength} x hires steps {steps} leaves no step to run")
    return HiresFix(width=width, height=height, upscaler=req.hr_upscaler or "Latent", steps=steps,
                    denoising_strength=strength, scale=scale)


def list_loras(folder: Path | None) -> list[dict]:
    if folder is None:
        return []
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in LORA_SUFFIXES)
    return [{"name": p.stem, "alias": p.stem, "path": str(p), "metadata": {}} for p in files]


def router(service: Service) -> APIRouter:
    api = APIRouter(prefix="/sdapi/v1")

    @api.post("/txt2img")
    async def txt2img(req: Txt2ImgRequest, request: Request) -> dict:
        return await service.a1111_generate(to_job(req, img2img=False), request)

    @api.post("/img2img")
    async def img2img(req: Img2ImgRequest, request: Request) -> dict:
        return await service.a1111_generate(to_job(req, img2img=True), request)

    @api.get("/progress")
    async def progress(skip_current_image: bool = False) -> dict:
        return service.progress(include_image=not skip_current_image)

    @api.post("/interrupt")
    async def interrupt() -> Any:
        service.worker.interrupt()
        return None

    @api.get("/samplers")
    async def samplers() -> list:
        return sampler_items()

    @api.get("/schedulers")
    async def schedulers() -> list:
        return schedule_items()

    @api.get("/sd-models")
    async def sd_models() -> list:
        return [{"title": m, "model_name": m, "hash": None, "sha256": None, "filename": m, "config": None,
                 "description": service.engine.label(m)}
                for m in service.engine.available_models()]

    @api.get("/options")
    async def get_options() -> dict:
        return {"sd_model_checkpoint": service.engine.model_name, "sd_checkpoint_hash": None,
                "samples_format": "png", "sd_lora": "None"}

    @api.post("/options")
    async def set_options(req: OptionsRequest, request: Request) -> Any:
        if req.sd_model_checkpoint is not None:
            await service.switch_model(req.sd_model_checkpoint, request)
        return None

    @api.get("/loras")
    async def loras() -> list:
        return list_loras(service.settings.lora_dir)

    @api.get("/scripts")
    async def scripts() -> dict:  # webuiapi asks at start-up; no A1111 scripts run here
        return {"txt2img": [], "img2img": []}

    return api
