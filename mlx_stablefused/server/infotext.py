"""A1111's generation parameters: the ``parameters`` text of its PNGs and the ``info`` JSON of its API."""

from __future__ import annotations

import json
from typing import Any

from .. import __version__

VERSION = f"mlx-stablefused {__version__}"


def _value(v: Any) -> str:
    text = str(v)
    return json.dumps(text) if any(c in text for c in ',:\n"') else text  # A1111 quotes such values


def infotext(job: Any, seed: int, model_name: str, cfg_scale: float | None = None,
             extra: dict[str, Any] | None = None) -> str:
    """``prompt\\nNegative prompt: ...\\nSteps: 20, Sampler: Euler a, ...``, as A1111's create_infotext;
    ``cfg_scale`` overrides the job's (a sweep's cell), ``extra`` adds fields before the version."""
    fields: dict[str, Any] = {"Steps": job.steps, "Sampler": job.sampler.label}
    if job.sampler.schedule != "Automatic":
        fields["Schedule type"] = job.sampler.schedule
    fields.update({"CFG scale": job.cfg_scale if cfg_scale is None else cfg_scale, "Seed": seed,
                   "Size": f"{job.width}x{job.height}", "Model": model_name})
    hires = getattr(job, "hires", None)
    if getattr(job, "init_image", None) is not None:
        fields["Denoising strength"] = job.denoising_strength
    elif hires is not None:  # A1111's hires fields
        fields.update({"Denoising strength": hires.denoising_strength, "Hires upscale": hires.scale,
                       "Hires steps": hires.steps, "Hires upscaler": hires.upscaler})
    if getattr(job, "mask", None) is not None:
        fields["Mask blur"] = job.mask_blur
    fields.update(extra or {})
    fields["Version"] = VERSION
    lines = [job.prompt]
    if job.negative_prompt:
        lines.append(f"Negative prompt: {job.negative_prompt}")
    lines.append(", ".join(f"{k}: {_value(v)}" for k, v in fields.items()))
    return "\n".join(lines)


def info_json(job: Any, seeds: list[int], infotexts: list[str], model_name: str) -> str:
    """The ``info`` string of A1111's txt2img / img2img responses (Processed.js()), for what applies here."""
    count = len(seeds)
    return json.dumps({
        "prompt": job.prompt, "all_prompts": [job.prompt] * count,
        "negative_prompt": job.negative_prompt, "all_negative_prompts": [job.negative_prompt] * count,
        "seed": seeds[0] if seeds else job.seed, "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * count,
        "subseed_strength": 0, "width": job.width, "height": job.height, "sampler_name": job.sampler.label,
        "cfg_scale": job.cfg_scale, "steps": job.steps, "batch_size": job.batch_size, "restore_faces": False,
        "face_restoration_model": None, "sd_model_name": model_name, "sd_model_hash": None,
        "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": job.denoising_strength if job.init_image is not None else
        None if job.hires is None else job.hires.denoising_strength,
        "extra_generation_params": {"Schedule type": job.sampler.schedule}, "index_of_first_image": 0,
        "infotexts": infotexts, "styles": [], "job_timestamp": job.timestamp, "clip_skip": 1,
        "is_using_inpainting_conditioning": False, "version": VERSION,
    })
