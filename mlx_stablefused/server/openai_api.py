"""The OpenAI Images API subset (/v1/images/generations, /v1/images/edits, /v1/models).

Extensions some clients send (``seed``, ``steps``, ``negative_prompt``, ``cfg_scale``, ``sampler_name``)
are read when present; OpenAI's other fields (quality, style, user, background ...) are accepted and ignored.
"""

from __future__ import annotations

import base64
import time
from typing import Any

from fastapi import APIRouter, Request
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from .images import FieldError, decode_image
from .jobs import GenerationJob
from .samplers import choose_sampler
from .service import Service, random_seed


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    prompt: str
    model: str | None = None
    n: int = Field(1, ge=1)
    size: str | None = None
    response_format: str | None = None
    seed: int | None = None
    steps: int | None = Field(None, ge=1)
    negative_prompt: str = ""
    cfg_scale: float = Field(7.0, allow_inf_nan=False)
    sampler_name: str | None = None


def parse_size(size: str | None, default: int) -> tuple[int, int]:
    """OpenAI's "WxH" (or "auto"): width, height, multiples of 8."""
    if size is None or size == "auto":
        return default, default
    parts = size.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise FieldError("size", f"expected 'WIDTHxHEIGHT' such as '512x512', got {size!r}")
    width, height = int(parts[0]), int(parts[1])
    if width < 8 or height < 8 or width % 8 or height % 8:
        raise FieldError("size", f"width and height must be positive multiples of 8, got {size!r}")
    return width, height


def check_response_format(value: str | None) -> None:
    if value not in (None, "b64_json"):
        raise FieldError("response_format", f"only 'b64_json' is served (no image hosting), got {value!r}")


def make_job(service: Service, req: GenerationRequest) -> GenerationJob:
    engine = service.engine
    width, height = parse_size(req.size, engine.default_size)
    return GenerationJob(prompt=req.prompt, negative_prompt=req.negative_prompt,
                         seed=random_seed() if req.seed is None or req.seed < 0 else req.seed,
                         steps=req.steps or engine.default_steps, cfg_scale=req.cfg_scale, width=width, height=height,
                         sampler=choose_sampler(req.sampler_name, None), batch_size=req.n)


def edit_mask(mask: Image.Image | None, image: Image.Image) -> Image.Image | None:
    """OpenAI's convention: the transparent part (alpha 0) is edited; without a mask, the image's own
    transparency; an opaque image and no mask: the whole image (image-to-image)."""
    source = mask if mask is not None else image
    if "A" in source.getbands():
        alpha = source.getchannel("A")
        return alpha.point(lambda a: 255 if a < 128 else 0)
    if mask is not None:
        return mask.convert("L")  # a plain black-and-white mask: white = repaint, as A1111 and diffusers
    return None


async def _form_image(form: Any, names: tuple[str, ...], field: str, required: bool) -> Image.Image | None:
    for name in names:
        item = form.get(name)
        if item is not None:
            data = await item.read() if hasattr(item, "read") else item
            return decode_image(data, field)
    if required:
        raise FieldError(field, "missing: send the image as a multipart file")
    return None


def _response(pngs: list[bytes]) -> dict:
    return {"created": int(time.time()),
            "data": [{"b64_json": base64.b64encode(p).decode("ascii")} for p in pngs]}


def router(service: Service) -> APIRouter:
    api = APIRouter(prefix="/v1")

    @api.post("/images/generations")
    async def generations(req: GenerationRequest, request: Request) -> dict:
        check_response_format(req.response_format)
        _, _, pngs = await service.generate(make_job(service, req), request, count_field="n")
        return _response(pngs)

    @api.post("/images/edits")
    async def edits(request: Request) -> dict:
        form = await request.form()
        fields = {k: v for k, v in form.items() if isinstance(v, str) and k not in ("image", "image[]", "mask")}
        req = GenerationRequest.model_validate(fields)
        check_response_format(req.response_format)
        image = await _form_image(form, ("image", "image[]"), "image", required=True)
        mask = await _form_image(form, ("mask",), "mask", required=False)
        job = make_job(service, req)
        if req.size is None:
            job.width, job.height = image.width // 8 * 8, image.height // 8 * 8
        job.init_image, job.mask = image, edit_mask(mask, image)
        job.inpainting_fill, job.mask_blur = 1, 0
        _, _, pngs = await service.generate(job, request, count_field="n")
        return _response(pngs)

    @api.get("/models")
    async def models() -> dict:
        return {"object": "list",
                "data": [{"id": m, "object": "model", "created": 0, "owned_by": service.engine.label(m)}
                         for m in service.engine.available_models()]}

    return api
