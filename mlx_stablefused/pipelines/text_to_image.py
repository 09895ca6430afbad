"""Text-to-image, with stablefused 0.2.0's keyword API plus ``seed``, ``num_images_per_prompt`` and
diffusers' ``callback_on_step_end``."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import UnsupportedModelError
from ..previews import check_preview_decoder
from . import inputs
from .base import Array, BaseDiffusion, PromptType, with_run_settings
from .data_parallel import ParallelCall, Shard
from .denoise import Guidance, StepCallback
from .sdxl_conditioning import (check_denoising_fraction, check_sdxl_keywords, default_image_side, denoising_end_index,
                                 sdxl_inputs)


class TextToImageDiffusion(BaseDiffusion):
    @with_run_settings
    def __call__(self, prompt: PromptType, image_height: int | None = None, image_width: int | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, guidance_rescale: float = 0.0,
                 negative_prompt: PromptType | None = None, latent: np.ndarray | None = None,
                 output_type: str = "pil", return_latent_history: bool = False, seed: int | None = None,
                 num_images_per_prompt: int = 1, callback_on_step_end: StepCallback | list | None = None,
                 denoising_end: float | None = None, history_decoder: str = "vae", control_image: Any = None,
                 controlnet_conditioning_scale: float | list[float] = 1.0,
                 control_guidance_start: float | list[float] = 0.0, control_guidance_end: float | list[float] = 1.0,
                 guess_mode: bool = False, ip_adapter_image: Any = None,
                 ip_adapter_image_embeds: Any = None, **sdxl: Any) -> Any:
        """Generate images for ``prompt``.

        ``latent``: initial noise (B, 4, h, w) in diffusers' layout (it is scaled by the
        sampler's initial sigma); else drawn from numpy with ``seed``. The size defaults to
        512x512 (SDXL: the UNet's sample_size times 8, 1024), or to the latent's size times 8.
        ``callback_on_step_end(pipe, step, timestep, tensors)`` runs after every step (see ``StepCallbacks``).

        SDXL models also take diffusers' keywords (``sdxl_conditioning``): ``prompt_2``,
        ``negative_prompt_2``, ``original_size``, ``crops_coords_top_left``, ``target_size``,
        ``negative_original_size``, ``negative_crops_coords_top_left``, ``negative_target_size``.
        ``denoising_end`` (a fraction in (0, 1)) stops the schedule there, for the base half of the
        base-to-refiner ensemble of experts (``output_type="latent"``, then the refiner's ``denoising_start``).
        ControlNet (``controlnet=`` / ``set_controlnet``; see ``pipelines/controlnet.py``): ``control_image`` (one
        image, a batch list, or with several ControlNets a list with one per ControlNet; of the output's size),
        ``controlnet_conditioning_scale`` (one, or one per ControlNet; diffusers' default 1.0),
        ``control_guidance_start`` / ``control_guidance_end`` (the fraction of the steps each ControlNet acts in) and
        ``guess_mode`` (the ControlNet sees the conditional half only, its residuals ramped), as diffusers.
        Without a size, the control image's size is the output's.
        """
        arguments = {k: v for k, v in locals().items() if k != "self"}
        # 1. Check inputs before any work.
        self._begin()
        self._check_output_type(output_type)
        check_preview_decoder(self, history_decoder)
        self.validate_steps(num_inference_steps)
        self._check_plain_image_model()
        guidance = Guidance(guidance_scale, guidance_rescale)
        prompts, negatives = inputs.expand_prompts(prompt, negative_prompt, num_images_per_prompt)
        if image_height is None and image_width is None and latent is None:
            image_height, image_width = self.control_image_size(control_image) or (None, None)
        height, width = self._resolve_size(image_height, image_width, latent)
        self.check_memory(height, width, len(prompts))
        denoising_end = check_denoising_fraction(denoising_end, "denoising_end")
        sdxl_call = sdxl_inputs(self, negative_prompt, height, width, text_to_image=True, **check_sdxl_keywords(sdxl))
        control = self.prepare_control(control_image, controlnet_conditioning_scale, control_guidance_start,
                                       control_guidance_end, guess_mode, (height, width),
                                       len(prompts) // num_images_per_prompt, num_images_per_prompt, guidance.enabled)
        f = self.vae_scale_factor
        shape = (len(prompts), self.latent_channels, height // f, width // f)
        parallel = ParallelCall.begin(self, "TextToImageDiffusion.__call__", arguments, seed)  # under a launch
        rng = inputs.make_rng(parallel.seed)
        noise = inputs.given_or_random(latent, shape, rng, "latent (batch = prompts x num_images_per_prompt, "
                                                           "channels, height/8, width/8)")
        image_prompt = self.check_image_prompt(ip_adapter_image, ip_adapter_image_embeds, len(prompts), guidance.enabled)
        # 2. Encode the prompt (and the image prompt).
        positive, negative = self.encode_prompt(prompts, negatives, sdxl_call, num_images_per_prompt)
        positive, negative = self.add_image_prompt(positive, negative, image_prompt)
        self.scheduler.set_timesteps(num_inference_steps)
        stop = denoising_end_index(self.scheduler, denoising_end)

        def generate(shard: Shard, output: str) -> Any:  # the whole batch, or this rank's window of it
            # 3. Prepare the latents.
            latents = self.backend.latent_from_numpy(shard.take(noise) * np.float32(self.scheduler.init_noise_sigma))
            # 4. Denoise.
            history = self.run_denoise(latents, shard.take(positive), shard.take(negative), guidance, rng,
                                       callback_on_step_end=callback_on_step_end,
                                       return_latent_history=return_latent_history, stop=stop,
                                       step_conditioning=shard.take(control),
                                       step_noise=shard.noise_source)
            # 5. Decode.
            return self.resolve_output(history, output, return_latent_history, history_decoder=history_decoder)

        return parallel.map_batch(len(prompts), generate, output_type)

    generate = __call__

    def _check_plain_image_model(self) -> None:
        if self.backend.is_video_unet and self.backend.motion_config is None:
            raise UnsupportedModelError("this is a text-to-video model (UNet3D); use TextToVideoDiffusion")
        if self.backend.unet_config.in_channels != self.latent_channels:
            raise UnsupportedModelError(
                f"this UNet takes {self.backend.unet_config.in_channels} input channels (an inpainting model); "
                "text-to-image needs a plain model")

    def _resolve_size(self, height: int | None, width: int | None, latent: Any) -> tuple[int, int]:
        if latent is None:
            side = default_image_side(self.backend, self.vae_scale_factor)
            height = side if height is None else height
            width = side if width is None else width
        else:
            shape = np.shape(latent)
            if len(shape) != 4:
                raise ValueError(f"latent must be (B, C, h, w), got shape {shape}")
            f = self.vae_scale_factor
            lh, lw = shape[2] * f, shape[3] * f
            asked = (lh if height is None else height, lw if width is None else width)
            if asked != (lh, lw):
                raise ValueError(f"latent of shape {shape} gives {lh}x{lw} images, "
                                 f"but image_height={height} and image_width={width} were asked for")
            height, width = lh, lw
        self.validate_size(height, width)
        return height, width

    def embedding_to_latent(self, embedding: Array, image_height: int, image_width: int, num_inference_steps: int,
                            guidance_scale: float, guidance_rescale: float, latent: np.ndarray | None = None,
                            return_latent_history: bool = False, seed: int | None = None) -> list[Array]:
        """Denoise from initial noise for ``embedding`` (``[uncond; cond]``); returns the latents after each
        step (the first is the start), or only the final one."""
        self._check_plain_image_model()
        self.validate_size(image_height, image_width)
        f = self.vae_scale_factor
        shape = (embedding.shape[0] // 2, self.latent_channels, image_height // f, image_width // f)
        rng = inputs.make_rng(seed)
        noise = inputs.given_or_random(latent, shape, rng, "latent (batch = prompts x num_images_per_prompt, "
                                                           "channels, height/8, width/8)")
        return self.sample_from_noise(embedding, noise, num_inference_steps, guidance_scale, guidance_rescale, rng,
                                      return_latent_history)
