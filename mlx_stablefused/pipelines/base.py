"""BaseDiffusion: model loading, prompts, guidance, the denoising loop, VAE encode/decode, outputs.

Written once for every backend: it holds backend-native arrays and touches them only
through arithmetic, the sampler, and the ``Backend`` methods. Randomness comes from
numpy (seeded), so one seed gives the same noise on MLX and torch, Mac and NVIDIA.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..backends import create_backend
from ..backends.base import Array
from ..config import read_json
from ..errors import ModelSourceError
from ..schedulers import Scheduler, default_scheduler_name, make_scheduler
from ..sources import resolve_model
from ..tokenizer import CLIPTokenizer
from ..utils.images import denormalize, normalize, numpy_to_pil, pil_to_numpy

PromptType = str | Sequence[str]
OUTPUT_TYPES = ("pil", "np", "latent")


def as_prompt_list(prompt: PromptType, name: str = "prompt") -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise TypeError(f"{name} must be a string or a non-empty list of strings, got {prompt!r:.80}")


class BaseDiffusion:
    """Shared machinery of every pipeline. ``model_id``: hub repo id, diffusers folder, or converted folder."""

    def __init__(self, model_id: str | Path, *, backend: str = "mlx", dtype: str = "float32",
                 device: str | None = None, variant: str | None = None, revision: str | None = None,
                 use_cache: bool = True, local_files_only: bool = False, scheduler: str | None = None,
                 progress: bool = True) -> None:
        self.model_id = model_id
        self.source = resolve_model(model_id, variant=variant, revision=revision,
                                    local_files_only=local_files_only)
        self.backend = create_backend(backend, self.source, dtype=dtype, variant=variant, use_cache=use_cache,
                                      device=device)
        self.tokenizer = CLIPTokenizer.from_folder(self.source.root / "tokenizer")
        scheduler_file = self.source.root / "scheduler" / "scheduler_config.json"
        if not scheduler_file.is_file():
            raise ModelSourceError(f"{scheduler_file} is missing")
        self.scheduler_config: dict[str, Any] = read_json(scheduler_file)
        self.vae_scale_factor = self.backend.vae_config.downscale_factor
        self.progress = progress
        self.scheduler: Scheduler = self.set_scheduler(scheduler or default_scheduler_name(self.scheduler_config))

    # ----------------------------------------------------------------------------------- setup
    def set_scheduler(self, name: str, **overrides: Any) -> Scheduler:
        """Switch sampler by stablefused name, configured from the model's scheduler config + ``overrides``."""
        self.scheduler = make_scheduler(name, self.scheduler_config, **overrides)
        return self.scheduler

    @property
    def latent_channels(self) -> int:
        return self.backend.vae_config.latent_channels

    def enable_attention_slicing(self, slice_size: int | None = 1024) -> None:
        """Attend in chunks of ``slice_size`` query tokens to cap attention memory (None: disable)."""
        self.backend.set_attention_chunk(slice_size)

    def disable_attention_slicing(self) -> None:
        self.backend.set_attention_chunk(None)

    # ------------------------------------------------------------------------------- validation
    def validate_size(self, height: int, width: int) -> None:
        f = self.vae_scale_factor
        for name, v in (("image_height", height), ("image_width", width)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
            if v % f:
                raise ValueError(f"{name}={v} is not a multiple of {f} (the VAE's downscale factor)")

    @staticmethod
    def validate_steps(num_inference_steps: int) -> None:
        if not isinstance(num_inference_steps, (int, np.integer)) or isinstance(num_inference_steps, bool) \
                or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")

    # ---------------------------------------------------------------------------------- prompts
    def prompt_pairs(self, prompt: PromptType, negative_prompt: PromptType | None) -> tuple[list[str], list[str]]:
        prompts = as_prompt_list(prompt)
        if negative_prompt is None:
            negatives = [""] * len(prompts)
        elif isinstance(negative_prompt, str):
            negatives = [negative_prompt] * len(prompts)
        else:
            negatives = as_prompt_list(negative_prompt, "negative_prompt")
            if len(negatives) != len(prompts):
                raise ValueError(f"{len(prompts)} prompt(s) but {len(negatives)} negative prompt(s); "
                                 "pass one negative prompt per prompt, or a single string")
        return prompts, negatives

    def prompt_to_embedding(self, prompt: PromptType, negative_prompt: PromptType | None = None) -> Array:
        """Text embeddings ``[uncond; cond]``, shape (2B, 77, D); ``negative_prompt`` defaults to ""."""
        prompts, negatives = self.prompt_pairs(prompt, negative_prompt)
        ids = np.concatenate([self.tokenizer(negatives), self.tokenizer(prompts)], axis=0)
        return self.backend.encode_text(ids)

    # --------------------------------------------------------------------------------- guidance
    def classifier_free_guidance(self, prediction: Array, guidance_scale: float, guidance_rescale: float) -> Array:
        """``uncond + s * (cond - uncond)``, optionally rescaled toward cond's std (arXiv 2305.08891)."""
        b = prediction.shape[0] // 2
        uncond, cond = prediction[:b], prediction[b:]
        guided = uncond + (cond - uncond) * float(guidance_scale)
        if guidance_rescale > 0:
            std = self.backend.per_sample_std
            rescaled = guided * (std(cond) / std(guided))
            guided = rescaled * float(guidance_rescale) + guided * (1.0 - float(guidance_rescale))
        return guided

    # ------------------------------------------------------------------------------------ noise
    @staticmethod
    def make_rng(seed: int | np.random.Generator | None) -> np.random.Generator:
        if isinstance(seed, np.random.Generator):
            return seed
        if seed is not None and (not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0):
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        return np.random.default_rng(seed)

    @staticmethod
    def random_latent(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    # ------------------------------------------------------------------------------ the loop
    def denoise_steps(self, latent: Array, embedding: Array, guidance_scale: float, guidance_rescale: float,
                      rng: np.random.Generator, start_step: int = 0) -> Iterator[Array]:
        """Run the sampler from step ``start_step``; yield the latent after each step.

        ``embedding`` is ``[uncond; cond]``; at guidance_scale == 1 exactly the
        unconditional half cannot change the result and is skipped.
        """
        scheduler, backend = self.scheduler, self.backend
        do_cfg = float(guidance_scale) != 1.0
        b = embedding.shape[0] // 2
        context = embedding if do_cfg else embedding[b:]
        public_shape = tuple(self.backend.latent_to_numpy(latent[:1]).shape[1:])
        noise_shape = (latent.shape[0],) + public_shape

        def noise() -> Array:
            return backend.latent_from_numpy(self.random_latent(noise_shape, rng))

        steps = range(start_step, len(scheduler.timesteps))
        for i in tqdm(steps, disable=not self.progress, desc="denoising", leave=False):
            x = scheduler.scale_model_input(latent, i)
            prediction = backend.unet(backend.concat([x, x]) if do_cfg else x, float(scheduler.timesteps[i]), context)
            if do_cfg:
                prediction = self.classifier_free_guidance(prediction, guidance_scale, guidance_rescale)
            latent = scheduler.step(prediction, i, latent, noise)
            backend.evaluate(latent)
            yield latent

    # ------------------------------------------------------------------------------------- VAE
    def latent_to_image(self, latent: Array | np.ndarray, output_type: str = "pil",
                        decode_batch_size: int | None = None) -> Any:
        """Decode scaled latents (native, or numpy (B, C, h, w)) to images of ``output_type``."""
        self._check_output_type(output_type)
        if isinstance(latent, np.ndarray):
            latent = self.backend.latent_from_numpy(latent)
        if output_type == "latent":
            return self.backend.latent_to_numpy(latent)
        cfg = self.backend.vae_config
        n = latent.shape[0]
        step = decode_batch_size or n
        chunks = []
        for s in range(0, n, step):
            z = latent[s:s + step] * (1.0 / cfg.scaling_factor)
            if cfg.shift_factor:
                z = z + cfg.shift_factor
            decoded = self.backend.vae_decode(z)
            chunks.append(self.backend.images_to_numpy(decoded))
        images = denormalize(np.concatenate(chunks, axis=0)).astype(np.float32)
        return self._format_images(images, output_type)

    def _format_images(self, images: np.ndarray, output_type: str) -> Any:
        if output_type == "np":
            return images
        if output_type == "pil":
            return numpy_to_pil(images)
        return self.backend.images_from_numpy(images)  # the backend's native array type

    def image_to_latent(self, image: Image.Image | Sequence[Image.Image] | np.ndarray) -> Array:
        """Scaled latent of ``image``: mapped to [-1, 1], posterior mean times the VAE scaling factor."""
        pixels = self.preprocess_image(image)
        mean, _ = self.backend.vae_encode(self.backend.images_from_numpy(normalize(pixels)))
        cfg = self.backend.vae_config
        if cfg.shift_factor:
            mean = mean - cfg.shift_factor
        return mean * cfg.scaling_factor

    def preprocess_image(self, image: Any) -> np.ndarray:
        """PIL / list of PIL / (B,)H,W,3 numpy (uint8, or float in [0, 1]) -> (B, H, W, 3) float32 in [0, 1]."""
        if isinstance(image, Image.Image) or (isinstance(image, (list, tuple)) and image
                                              and all(isinstance(i, Image.Image) for i in image)):
            pixels = pil_to_numpy(image)
        elif isinstance(image, np.ndarray):
            pixels = image[None] if image.ndim == 3 else image
            if pixels.ndim != 4 or pixels.shape[-1] != 3:
                raise ValueError(f"image arrays must be (H, W, 3) or (B, H, W, 3), got {image.shape}")
            if pixels.dtype == np.uint8:
                pixels = pixels.astype(np.float32) / 255.0
            else:
                pixels = pixels.astype(np.float32)
                if pixels.min() < 0.0 or pixels.max() > 1.0:
                    raise ValueError("float image arrays must be in [0, 1]")
        else:
            raise TypeError(f"image must be a PIL image, a list of them, or a numpy array, got {type(image).__name__}")
        self.validate_size(pixels.shape[1], pixels.shape[2])
        return pixels

    # --------------------------------------------------------------------------------- outputs
    def _check_output_type(self, output_type: str) -> None:
        allowed = OUTPUT_TYPES + (self.backend.name,)
        if output_type not in allowed:
            raise ValueError(f"unknown output_type {output_type!r}; expected one of {allowed}")

    def resolve_output(self, latents: list[Array], output_type: str, return_latent_history: bool) -> Any:
        """Final latent -> images; with history, every step's latent per prompt: (B, steps+1, ...)."""
        if not return_latent_history:
            return self.latent_to_image(latents[-1], output_type)
        if output_type == "latent":
            return np.stack([self.backend.latent_to_numpy(x) for x in latents], axis=1)
        frames = [self.latent_to_image(x, "np") for x in latents]  # each (B, H, W, 3)
        history = np.stack(frames, axis=1)  # (B, steps+1, H, W, 3)
        if output_type == "np":
            return history
        if output_type == "pil":
            return [numpy_to_pil(row) for row in history]
        return self.backend.images_from_numpy(history)
