"""Image-to-image: noise an image's latent part-way, then denoise it toward the prompt."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..previews import check_preview_decoder
from . import inputs
from .base import Array, BaseDiffusion, PromptType, with_run_settings
from .data_parallel import ParallelCall, Shard
from .denoise import Guidance, StepCallback
from .sdxl_conditioning import (check_denoising_range, check_sdxl_keywords, denoising_end_index,
                                 denoising_start_index, given_latents, sdxl_inputs)


class ImageToImageDiffusion(BaseDiffusion):
    @with_run_settings
    def __call__(self, image: Any, prompt: PromptType, num_inference_steps: int = 50, start_step: int | None = None,
                 guidance_scale: float = 7.5, guidance_rescale: float = 0.0,
                 negative_prompt: PromptType | None = None, output_type: str = "pil",
                 return_latent_history: bool = False, strength: float | None = None,
                 noise: np.ndarray | None = None, seed: int | None = None, num_images_per_prompt: int = 1,
                 image_height: int | None = None, image_width: int | None = None,
                 callback_on_step_end: StepCallback | list | None = None, denoising_start: float | None = None,
                 denoising_end: float | None = None, history_decoder: str = "vae", control_image: Any = None,
                 controlnet_conditioning_scale: float | list[float] = 0.8,
                 control_guidance_start: float | list[float] = 0.0, control_guidance_end: float | list[float] = 1.0,
                 guess_mode: bool = False, ip_adapter_image: Any = None,
                 ip_adapter_image_embeds: Any = None, **sdxl: Any) -> Any:
        """Re-imagine ``image`` (path, PIL, list, or NHWC numpy) following ``prompt``.

        How much of the schedule runs: ``start_step`` (stablefused: skip that many of the
        ``num_inference_steps``; more = closer to the input) or ``strength`` (diffusers: the fraction
        that runs; less = closer). Neither: start_step=0, i.e. the image only seeds the noise.
        ``noise``: the Gaussian noise added to the image latent, (B, 4, h, w) numpy; else from ``seed``.
        ``image_height``/``image_width`` resize the input; otherwise its size must be a multiple of 8.

        SDXL models take diffusers' keywords (``sdxl_conditioning``): ``prompt_2``, ``negative_prompt_2``,
        the micro-conditioning sizes and crops and their ``negative_*`` forms, and for a refiner
        ``aesthetic_score`` (6.0) / ``negative_aesthetic_score`` (2.5). The base-to-refiner ensemble of
        experts: ``image`` may be the scaled latents (B, 4, h, w) numpy that a ``denoising_end`` run returned
        with ``output_type="latent"``, and ``denoising_start`` (instead of ``start_step``/``strength``)
        continues from that fraction of the schedule without adding noise; ``denoising_end`` stops early.
        ControlNet (``controlnet=`` / ``set_controlnet``; see ``pipelines/controlnet.py``): ``control_image`` (one
        image, a batch list, or with several ControlNets a list with one per ControlNet; of the output's size),
        ``controlnet_conditioning_scale`` (one, or one per ControlNet; diffusers' default 0.8),
        ``control_guidance_start`` / ``control_guidance_end`` (the fraction of the steps each ControlNet acts in) and
        ``guess_mode`` (the ControlNet sees the conditional half only, its residuals ramped), as diffusers.
        """
        arguments = {k: v for k, v in locals().items() if k != "self"}
        # 1. Check inputs.
        self._begin()
        self._check_output_type(output_type)
        check_preview_decoder(self, history_decoder)
        self.validate_steps(num_inference_steps)
        guidance = Guidance(guidance_scale, guidance_rescale)
        prompts, negatives = inputs.expand_prompts(prompt, negative_prompt, num_images_per_prompt)
        size = inputs.requested_size(image_height, image_width, self.vae_scale_factor)
        if size is not None:
            self.check_memory(*size, len(prompts))
        latent_input = given_latents(image, self.latent_channels)
        if latent_input is None:
            pixels = self.preprocess_image(image, size)
            height, width = pixels.shape[1:3]
            pixels = inputs.match_batch(pixels, len(prompts) // num_images_per_prompt, num_images_per_prompt, "image")
        else:
            height, width = (n * self.vae_scale_factor for n in latent_input.shape[2:])
            latent_input = inputs.match_batch(latent_input, len(prompts) // num_images_per_prompt,
                                              num_images_per_prompt, "image latent")
        if (height, width) != size:  # not yet checked at this size
            self.check_memory(height, width, len(prompts))
        denoising_start, denoising_end = check_denoising_range(denoising_start, denoising_end, start_step, strength)
        if denoising_start is None:
            start = inputs.start_index(num_inference_steps, start_step, strength, self.scheduler.order)
        sdxl_call = sdxl_inputs(self, negative_prompt, height, width, text_to_image=False,
                                **check_sdxl_keywords(sdxl, aesthetic=True))
        control = self.prepare_control(control_image, controlnet_conditioning_scale, control_guidance_start,
                                       control_guidance_end, guess_mode, (height, width),
                                       len(prompts) // num_images_per_prompt, num_images_per_prompt, guidance.enabled)
        image_prompt = self.check_image_prompt(ip_adapter_image, ip_adapter_image_embeds, len(prompts), guidance.enabled)
        parallel = ParallelCall.begin(self, "ImageToImageDiffusion.__call__", arguments, seed)  # under a launch
        # 2. Encode the prompt (and the image prompt).
        positive, negative = self.encode_prompt(prompts, negatives, sdxl_call, num_images_per_prompt)
        positive, negative = self.add_image_prompt(positive, negative, image_prompt)
        # 3. Prepare timesteps and latents: the image's latent noised to the start (with denoising_start:
        # already noisy latents, taken as they are).
        self.scheduler.set_timesteps(num_inference_steps)
        rng = inputs.make_rng(parallel.seed)
        if latent_input is None:
            image_latent = self.pixels_to_latent(pixels)
        else:
            image_latent = self.backend.latent_from_numpy(latent_input)
        if denoising_start is None:
            latents = self._noised(image_latent, start, noise, rng)
        else:
            start, latents = denoising_start_index(self.scheduler, denoising_start), image_latent
        stop = denoising_end_index(self.scheduler, denoising_end)

        def generate(shard: Shard, output: str) -> Any:  # the whole batch, or this rank's window of it
            # 4. Denoise.
            history = self.run_denoise(shard.take(latents), shard.take(positive), shard.take(negative), guidance,
                                       rng, start, callback_on_step_end=callback_on_step_end,
                                       return_latent_history=return_latent_history, stop=stop,
                                       step_conditioning=shard.take(control),
                                       step_noise=shard.noise_source)
            # 5. Decode.
            return self.resolve_output(history, output, return_latent_history, history_decoder=history_decoder)

        return parallel.map_batch(len(prompts), generate, output_type)

    generate = __call__

    def _noised(self, image_latent: Array, start: int, noise: np.ndarray | None, rng: np.random.Generator) -> Array:
        eps = inputs.given_or_random(noise, self.backend.latent_shape(image_latent), rng, "noise")
        return self.scheduler.add_noise(image_latent, self.backend.latent_from_numpy(eps), start)

    @with_run_settings
    def embedding_to_latent(self, embedding: Array, image_latent: Array, start: int, guidance_scale: float,
                            guidance_rescale: float, noise: np.ndarray | None = None, seed: int | None = None,
                            return_latent_history: bool = False) -> list[Array]:
        """Noise ``image_latent`` to table index ``start`` and denoise from there (timesteps already set);
        ``embedding`` is ``[uncond; cond]``."""
        rng = inputs.make_rng(seed)
        positive, negative = self.split_embedding(embedding)
        return self.run_denoise(self._noised(image_latent, start, noise, rng), positive, negative,
                                Guidance(guidance_scale, guidance_rescale), rng, start,
                                return_latent_history=return_latent_history)


__all__ = ["ImageToImageDiffusion"]
