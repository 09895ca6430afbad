"""The one model in memory and how a GenerationJob runs on it (on the worker thread only: not thread-safe)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from ..demo import DEMO_MODEL_ID, DEMO_NOTICE, DEMO_SIZE, DEMO_STEPS
from .images import FieldError
from .jobs import GenerationJob, RunControl, step_callback
from .settings import ServerSettings
from .worker import Worker

SEED_RANGE = 2 ** 32  # A1111's seeds are 32-bit


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seeds: list[int]
    interrupted: bool


class Engine:
    """The one model in memory and the one thread that touches it (MLX streams belong to a thread, and
    neither backend is thread-safe): loads a model into a text-to-image pipeline and shares its weights
    with image-to-image and inpainting pipelines (``from_pipeline``: nothing loaded twice)."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.model_id: str | None = None
        self.pipes: dict[str, Any] = {}
        self.worker = Worker(settings.limits.max_queue, on_exit=self._release_thread)

    def call(self, fn: Any) -> Any:
        """Run ``fn(engine)`` on the worker thread and wait for it (start-up loading; tests)."""
        return self.worker.submit(lambda control: fn(self), RunControl()).future.result()

    def close(self) -> None:
        self.worker.close()

    def _release_thread(self) -> None:
        """MLX streams belong to the thread that made them; destroyed before it ends, or the process may
        abort at exit ("terminate called without an active exception", ml-explore/mlx#3126)."""
        if self.settings.backend == "mlx":
            import mlx.core as mx

            if hasattr(mx, "clear_streams"):  # recent MLX; older ones have no such call
                mx.clear_streams()

    @property
    def is_demo(self) -> bool:
        return self.model_id == DEMO_MODEL_ID

    @property
    def model_name(self) -> str:
        """How clients see the model (A1111's checkpoint title, OpenAI's model id)."""
        return str(self.model_id)

    @property
    def default_size(self) -> int:
        """The pipeline's own default side (SDXL: 1024), smaller for the demo model, as the CLI's."""
        from ..pipelines.sdxl_conditioning import default_image_side

        if self.is_demo:
            return DEMO_SIZE
        base = self.pipes["txt2img"]
        return default_image_side(base.backend, base.vae_scale_factor)

    @property
    def default_steps(self) -> int:
        return DEMO_STEPS if self.is_demo else 30

    def label(self, model: str) -> str:
        """The demo model is said to be one wherever models are listed, as the CLI says it."""
        return "demo model: tiny, random weights, noise by design" if model == DEMO_MODEL_ID else "mlx-stablefused"

    def available_models(self) -> list[str]:
        """What /sd-models lists and sd_model_checkpoint may switch to: the served model and the demo."""
        return list(dict.fromkeys([m for m in (self.model_id, self.settings.model, DEMO_MODEL_ID) if m]))

    def load(self, model_id: str) -> None:
        """Load ``model_id``; the previous model stays in use if this fails (so it is freed only after)."""
        from ..pipelines.image_to_image import ImageToImageDiffusion
        from ..pipelines.inpaint import InpaintDiffusion
        from ..pipelines.text_to_image import TextToImageDiffusion

        s = self.settings
        if model_id == DEMO_MODEL_ID:
            print(DEMO_NOTICE, file=sys.stderr)
        base = TextToImageDiffusion(model_id=model_id, backend=s.backend, dtype=s.dtype, device=s.device,
                                    variant=s.variant, progress=False)
        base.enable_prompt_weighting(lora_dir=s.lora_dir)  # A1111 syntax and <lora:name:w> tags
        self.pipes = {"txt2img": base, "img2img": ImageToImageDiffusion.from_pipeline(base),
                      "inpaint": InpaintDiffusion.from_pipeline(base)}
        self.model_id = model_id

    def walk_pipeline(self) -> Any:
        """Prompt interpolation and latent walks, on the loaded model's weights (SD 1.x / 2.x only)."""
        from ..pipelines.latent_walk import LatentWalkDiffusion

        if "walk" not in self.pipes:
            self.pipes["walk"] = LatentWalkDiffusion.from_pipeline(self.pipes["txt2img"])
        return self.pipes["walk"]

    def video_pipeline(self) -> Any:
        """AnimateDiff on the loaded model with the served motion adapter, loaded on first use (a UNet with
        motion modules is a second copy of the model's weights in memory); refused when there is none."""
        from ..pipelines.text_to_video import TextToVideoDiffusion
        from .media import motion_adapter_for

        reason = self.video_unavailable()
        if reason is not None:
            raise FieldError("kind", reason)
        if "video" not in self.pipes:
            s = self.settings
            pipe = TextToVideoDiffusion(model_id=self.model_id, motion_adapter=motion_adapter_for(
                self.model_id, s.motion_adapter), backend=s.backend, dtype=s.dtype, device=s.device,
                variant=s.variant, progress=False)
            pipe.enable_prompt_weighting(lora_dir=s.lora_dir)
            self.pipes["video"] = pipe
        return self.pipes["video"]

    def video_unavailable(self) -> str | None:
        """Why this model cannot make AnimateDiff videos here, or None."""
        from ..pipelines.sdxl_conditioning import is_sdxl
        from .media import motion_adapter_for

        if is_sdxl(self.pipes["txt2img"].backend):
            return "AnimateDiff needs an SD 1.x model; the served model is SDXL"
        if motion_adapter_for(self.model_id, self.settings.motion_adapter) is None:
            return ("no motion adapter is served: start the server with --motion-adapter "
                    "(e.g. guoyww/animatediff-motion-adapter-v1-5-2) for AnimateDiff videos")
        return None

    def walk_unavailable(self) -> str | None:
        from ..pipelines.sdxl_conditioning import is_sdxl

        if is_sdxl(self.pipes["txt2img"].backend):
            return "prompt interpolation and latent walks do not take SDXL models yet"
        return None

    def generate(self, job: GenerationJob, control: RunControl) -> GenerationResult:
        """Image k of the job from seed ``seed + k`` (A1111's numbering), one image at a time."""
        pipe = self.pipes[job.mode]
        pipe.set_scheduler(job.sampler.ours, **job.sampler.overrides)
        if job.hires is not None:
            self.pipes["img2img"].set_scheduler(job.sampler.ours, **job.sampler.overrides)
        image, mask = self.prepare_inputs(job, pipe)
        control.preview_scale = pipe.vae_scale_factor
        images, seeds = [], []
        for k in range(job.count):
            if control.interrupted:
                break
            control.image_started(k)
            seed = (job.seed + k) % SEED_RANGE
            images.append(self.render(job, control, seed, image, mask))
            seeds.append(seed)
        return GenerationResult(images, seeds, control.interrupted)

    def render(self, job: GenerationJob, control: RunControl, seed: int, image: Any = None, mask: Any = None,
               cfg_scale: float | None = None) -> Image.Image:
        """One image of ``job`` (its sampler already set) from ``seed``; ``cfg_scale`` overrides the job's."""
        pipe = self.pipes[job.mode]
        common = dict(prompt=job.prompt, negative_prompt=job.negative_prompt, num_inference_steps=job.steps,
                      guidance_scale=job.cfg_scale if cfg_scale is None else cfg_scale, seed=seed,
                      callback_on_step_end=step_callback(control))
        if job.mode == "txt2img":
            if job.hires is None:
                return pipe(image_height=job.height, image_width=job.width, **common)[0]
            return self._hires(job, control, common)
        size = {} if isinstance(image, np.ndarray) else dict(image_height=job.height, image_width=job.width)
        if job.mode == "img2img":
            return pipe(image=image, strength=job.denoising_strength, **size, **common)[0]
        return pipe(image=image, mask=mask, strength=job.denoising_strength, masked_content=job.masked_content,
                    **size, **common)[0]

    def _hires(self, job: GenerationJob, control: RunControl, common: dict) -> Image.Image:
        """A1111's hires fix: the first pass at width x height, upscaled (its latent, or its image with PIL),
        then image-to-image at the target size with the hires denoising strength."""
        from .resize import hr_upscaler, interpolate_latent

        hr = job.hires
        kind, method = hr_upscaler(hr.upscaler)
        first = self.pipes["txt2img"](image_height=job.height, image_width=job.width,
                                      output_type="latent" if kind == "latent" else "pil", **common)
        if control.interrupted:
            return self.pipes["txt2img"].latent_to_image(first)[0] if kind == "latent" else first[0]
        f = self.pipes["txt2img"].vae_scale_factor
        if kind == "latent":
            source: Any = interpolate_latent(first, hr.height // f, hr.width // f, str(method))
        else:
            source = first[0].resize((hr.width, hr.height), method)
        second = {**common, "num_inference_steps": hr.steps, "callback_on_step_end": step_callback(control, job.steps)}
        return self.pipes["img2img"](image=source, strength=hr.denoising_strength, **second)[0]

    def prepare_inputs(self, job: GenerationJob, pipe: Any) -> tuple[Any, Image.Image | None]:
        """A1111's preparation: the image brought to the job's size by ``resize_mode`` (3: its latent, upscaled);
        the mask inverted and blurred as asked; masked content filled (fill = 0)."""
        from .resize import IMAGE_RESIZERS, interpolate_latent, latent_source_size

        if job.init_image is None:
            return None, None
        image = job.init_image.convert("RGB")
        if job.resize_mode == 3 and job.mask is None:
            f = pipe.vae_scale_factor
            latent = np.asarray(pipe.backend.latent_to_numpy(pipe.pixels_to_latent(
                pipe.preprocess_image(latent_source_size(image)))))
            return interpolate_latent(latent, job.height // f, job.width // f), None
        image = IMAGE_RESIZERS.get(job.resize_mode, IMAGE_RESIZERS[0])(image, job.width, job.height)
        if job.mask is None:
            return image, None
        mask = job.mask.convert("L").resize(image.size, Image.Resampling.LANCZOS)
        if job.inpainting_mask_invert:
            mask = ImageOps.invert(mask)
        if job.mask_blur > 0:
            mask = mask.filter(ImageFilter.GaussianBlur(job.mask_blur))
        if job.inpainting_fill == 0:
            image = fill_masked(image, mask)
        return image, mask


def fill_masked(image: Image.Image, mask: Image.Image, radius: int = 16) -> Image.Image:
    """A1111's "fill": the masked part painted with the blurred colours of what surrounds it (a normalised
    blur of the kept pixels), so the sampler does not start from the content being replaced."""
    keep = (np.asarray(mask, dtype=np.float32) < 128).astype(np.float32)
    pixels = np.asarray(image, dtype=np.float32)
    weight = Image.fromarray((keep * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(radius))
    weighted = Image.fromarray((pixels * keep[..., None]).astype(np.uint8)).filter(ImageFilter.GaussianBlur(radius))
    w = np.asarray(weight, dtype=np.float32)[..., None] / 255.0
    filled = np.asarray(weighted, dtype=np.float32) / np.maximum(w, 1e-3)
    if keep.sum() == 0:  # everything masked: the image's mean colour
        filled = np.broadcast_to(pixels.reshape(-1, 3).mean(0), pixels.shape)
    out = np.where(keep[..., None] > 0, pixels, np.clip(filled, 0, 255))
    return Image.fromarray(out.astype(np.uint8))


def save_outputs(folder: Path, request_id: str, pngs: list[bytes], seeds: list[int]) -> list[Path]:
    """Each PNG (its parameters inside, in A1111's chunk) written atomically under ``folder``."""
    from ..checkpoint_io import atomic_path

    paths = []
    for index, (data, seed) in enumerate(zip(pngs, seeds)):
        path = folder / f"{request_id}-{index}-{seed}.png"
        with atomic_path(path, suffix=".png") as tmp:
            tmp.write_bytes(data)
        paths.append(path)
    return paths
