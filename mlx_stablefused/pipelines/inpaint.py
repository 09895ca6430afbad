"""Inpainting: repaint the white part of a mask. 9-channel inpainting UNets get the mask and the
masked image as extra input channels; ordinary 4-channel models blend the known region back in
after every step (latent blending), so any model can inpaint."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ..errors import UnsupportedModelError
from ..previews import check_preview_decoder
from ..progress import progress_bar
from . import inputs
from .base import Array, BaseDiffusion, PromptType, with_run_settings
from .data_parallel import ParallelCall, Shard
from .denoise import Guidance, StepCallback
from .sdxl_conditioning import (check_denoising_range, check_sdxl_keywords, denoising_end_index, denoising_start_index,
                                 given_latents, sdxl_inputs)
from .walk_geometry import WalkType, pan_frames, parse_walk_type, shift_and_mask, shrink_and_mask, zoom_out_frames

MODES = ("auto", "unet", "blend")
# What the masked part of the image latent starts from (AUTOMATIC1111's "masked content" 1, 2, 3).
MASKED_CONTENT = ("original", "latent noise", "latent nothing")


class InpaintDiffusion(BaseDiffusion):
    @with_run_settings
    def __call__(self, prompt: PromptType, image: Any, mask: Any, image_height: int | None = None,
                 image_width: int | None = None, num_inference_steps: int = 50, start_step: int | None = None,
                 guidance_scale: float = 7.5, guidance_rescale: float = 0.0,
                 negative_prompt: PromptType | None = None, output_type: str = "pil",
                 return_latent_history: bool = False, strength: float | None = None,
                 noise: np.ndarray | None = None, seed: int | None = None, num_images_per_prompt: int = 1,
                 mode: str = "auto", callback_on_step_end: StepCallback | list | None = None,
                 history_decoder: str = "vae", masked_content: str = "original", control_image: Any = None,
                 controlnet_conditioning_scale: float | list[float] = 0.5,
                 control_guidance_start: float | list[float] = 0.0, control_guidance_end: float | list[float] = 1.0,
                 guess_mode: bool = False, ip_adapter_image: Any = None,
                 ip_adapter_image_embeds: Any = None, denoising_start: float | None = None,
                 denoising_end: float | None = None, **sdxl: Any) -> Any:
        """Repaint where ``mask`` is white (>= 0.5 after scaling to [0, 1]); keep where it is black.

        ``image``/``mask``: paths, PIL images (any mode; the mask is read as grayscale), lists, or
        numpy arrays. Without ``image_height``/``image_width`` they keep their size (a multiple of 8,
        equal for both). Start: ``start_step``/``strength`` as in image-to-image; at the default
        (start_step 0) the masked region starts from pure noise. ``mode``: "unet" (9-channel
        inpainting UNet), "blend" (latent blending, any model), or "auto" (by the UNet's channels).
        SDXL models take the keywords image-to-image takes (``prompt_2``, micro-conditioning, aesthetic scores).
        ControlNet (``controlnet=`` / ``set_controlnet``; see ``pipelines/controlnet.py``): ``control_image`` (one
        image, a batch list, or with several ControlNets a list with one per ControlNet; of the output's size),
        ``controlnet_conditioning_scale`` (one, or one per ControlNet; diffusers' default 0.5),
        ``control_guidance_start`` / ``control_guidance_end`` (the fraction of the steps each ControlNet acts in) and
        ``guess_mode`` (the ControlNet sees the conditional half only, its residuals ramped), as diffusers.
        An inpainting ControlNet (control_v11p_sd15_inpaint) takes the image with masked pixels set to -1.
        ``masked_content``: what the masked part of the image latent is before it is noised to the start:
        "original", or AUTOMATIC1111's "latent noise" (fresh Gaussian noise, drawn after ``noise``) and
        "latent nothing" (zeros).
        The ensemble of experts, as StableDiffusionXLInpaintPipeline runs it: ``denoising_end`` stops the
        schedule early (``output_type="latent"``); ``denoising_start`` (instead of ``start_step``/``strength``)
        continues from there on ``image`` = those latents (B, 4, h, w), without adding noise. On 4-channel
        models the blended-in known region is then those latents re-noised each step, and the last step of a
        ``denoising_end`` run blends the clean image latents, both as diffusers does.
        """
        arguments = {k: v for k, v in locals().items() if k != "self"}
        # 1. Check inputs.
        self._begin()
        self._check_output_type(output_type)
        check_preview_decoder(self, history_decoder)
        self.validate_steps(num_inference_steps)
        guidance = Guidance(guidance_scale, guidance_rescale)
        use_unet = self._resolve_mode(mode)
        if masked_content not in MASKED_CONTENT:
            raise ValueError(f"unknown masked_content {masked_content!r}; expected one of {MASKED_CONTENT}")
        prompts, negatives = inputs.expand_prompts(prompt, negative_prompt, num_images_per_prompt)
        num_prompts = len(prompts) // num_images_per_prompt
        size = inputs.requested_size(image_height, image_width, self.vae_scale_factor)
        if size is not None:  # the requested size is known before the image is read
            self.check_memory(*size, len(prompts))
        denoising_start, denoising_end = check_denoising_range(denoising_start, denoising_end, start_step, strength)
        latent_input = given_latents(image, self.latent_channels) if denoising_start is not None else None
        if latent_input is None:
            pixels = self.preprocess_image(image, size)
            height, width = pixels.shape[1:3]
        else:
            if use_unet:
                raise UnsupportedModelError("a 9-channel inpainting UNet takes the masked image itself as input: pass "
                                            "the image, not latents, with denoising_start (as diffusers needs it too)")
            height, width = (n * self.vae_scale_factor for n in latent_input.shape[2:])
        if size is None:
            self.check_memory(height, width, len(prompts))
        masks = inputs.load_mask(mask, (height, width), resize=size is not None)
        if latent_input is None:
            pixels = inputs.match_batch(pixels, num_prompts, num_images_per_prompt, "image")
        else:
            latent_input = inputs.match_batch(latent_input, num_prompts, num_images_per_prompt, "image latent")
        masks = inputs.match_batch(masks, num_prompts, num_images_per_prompt, "mask")
        if denoising_start is None:
            start = inputs.start_index(num_inference_steps, start_step, strength, self.scheduler.order)
        sdxl_call = sdxl_inputs(self, negative_prompt, height, width, text_to_image=False,
                                **check_sdxl_keywords(sdxl, aesthetic=True))
        control = self.prepare_control(control_image, controlnet_conditioning_scale, control_guidance_start,
                                       control_guidance_end, guess_mode, (height, width), num_prompts,
                                       num_images_per_prompt, guidance.enabled)
        image_prompt = self.check_image_prompt(ip_adapter_image, ip_adapter_image_embeds, len(prompts), guidance.enabled)
        parallel = ParallelCall.begin(self, "InpaintDiffusion.__call__", arguments, seed)  # under a launch
        # 2. Encode the prompt (and the image prompt).
        positive, negative = self.encode_prompt(prompts, negatives, sdxl_call, num_images_per_prompt)
        positive, negative = self.add_image_prompt(positive, negative, image_prompt)
        # 3. Prepare timesteps, latents and the mask conditioning.
        self.scheduler.set_timesteps(num_inference_steps)
        rng = inputs.make_rng(parallel.seed)
        image_latent = (self.pixels_to_latent(pixels) if latent_input is None
                        else self.backend.latent_from_numpy(latent_input))
        mask_latent = self.mask_to_latent(masks)
        eps = self.backend.latent_from_numpy(
            inputs.given_or_random(noise, self.backend.latent_shape(image_latent), rng, "noise"))
        start_latent = self._masked_content(image_latent, mask_latent, masked_content, rng)
        stop = denoising_end_index(self.scheduler, denoising_end)
        if denoising_start is not None:  # already noisy latents (or an image), taken as they are
            start, latents = denoising_start_index(self.scheduler, denoising_start), image_latent
        elif start == 0:
            latents = eps * float(self.scheduler.init_noise_sigma)  # the masked region starts from pure noise
        else:
            latents = self.scheduler.add_noise(start_latent, eps, start)
        if use_unet:
            masked = pixels * (1.0 - masks) + 0.5 * masks  # masked pixels become 0 in [-1, 1]
            channels = self.backend.concat_channels([mask_latent, self.pixels_to_latent(masked)])
            positive = replace(positive, image_channels=channels)
            negative = replace(negative, image_channels=channels)

        def generate(shard: Shard, output: str) -> Any:  # the whole batch, or this rank's window of it
            after_step = None if use_unet else self._blend_known_region(shard.take(image_latent),
                                                                        shard.take(mask_latent), shard.take(eps), stop)
            # 4. Denoise.
            history = self.run_denoise(shard.take(latents), shard.take(positive), shard.take(negative), guidance, rng,
                                       start, after_step=after_step, callback_on_step_end=callback_on_step_end,
                                       return_latent_history=return_latent_history, step_conditioning=shard.take(control),
                                       step_noise=shard.noise_source, stop=stop)
            # 5. Decode.
            return self.resolve_output(history, output, return_latent_history, history_decoder=history_decoder)

        return parallel.map_batch(len(prompts), generate, output_type)

    generate = __call__

    def _masked_content(self, image_latent: Array, mask_latent: Array, content: str,
                        rng: np.random.Generator) -> Array:
        """The image latent with its masked part replaced as ``masked_content`` says (the kept part as it is)."""
        if content == "original":
            return image_latent
        kept = image_latent * (mask_latent * -1.0 + 1.0)
        if content == "latent nothing":
            return kept
        fresh = inputs.random_latent(self.backend.latent_shape(image_latent), rng)
        return kept + self.backend.latent_from_numpy(fresh) * mask_latent

    def _resolve_mode(self, mode: str) -> bool:
        if mode not in MODES:
            raise ValueError(f"unknown inpainting mode {mode!r}; expected one of {MODES}")
        channels = self.backend.unet_config.in_channels
        latent = self.latent_channels
        is_inpainting_unet = channels == 2 * latent + 1
        if not is_inpainting_unet and channels != latent:
            raise UnsupportedModelError(f"a UNet with {channels} input channels is neither a plain "
                                        f"({latent}) nor an inpainting ({2 * latent + 1}) model")
        if mode == "unet" and not is_inpainting_unet:
            raise UnsupportedModelError(f"mode='unet' needs a {2 * latent + 1}-channel inpainting UNet; this one "
                                        f"takes {channels}. Use mode='blend' (or 'auto').")
        if mode == "blend" and is_inpainting_unet:
            raise UnsupportedModelError("mode='blend' needs a plain UNet; this is an inpainting UNet")
        return is_inpainting_unet

    @staticmethod
    def preprocess_mask(mask: Any, size: tuple[int, int], resize: bool = False) -> np.ndarray:
        """Grayscale mask(s) -> (B, H, W, 1) of 0/1, binarised at 0.5; resized to ``size`` only if asked."""
        return inputs.load_mask(mask, size, resize)

    def preprocess_image_and_mask(self, image: Any, mask: Any, image_height: int | None = None,
                                  image_width: int | None = None) -> tuple[Array, Array, Array]:
        """stablefused's building block: (image in [-1, 1] (B, 3, H, W), binarised mask (B, 1, H, W), masked
        image ``image * (1 - mask)``), native arrays in diffusers' layout, as ``__call__`` prepares them.
        Any image and mask types mix (stablefused required both of one type)."""
        size = inputs.requested_size(image_height, image_width, self.vae_scale_factor)
        pixels = self.preprocess_image(image, size)
        masks = inputs.load_mask(mask, pixels.shape[1:3], resize=size is not None)
        if masks.shape[0] != pixels.shape[0]:
            masks = inputs.match_batch(masks, pixels.shape[0], 1, "mask")
        image_nchw = (pixels * 2.0 - 1.0).transpose(0, 3, 1, 2)
        mask_nchw = masks.transpose(0, 3, 1, 2)
        native = self.backend.from_numpy
        return (native(np.ascontiguousarray(image_nchw)), native(np.ascontiguousarray(mask_nchw)),
                native(np.ascontiguousarray(image_nchw * (1.0 - mask_nchw))))

    def mask_to_latent(self, masks: np.ndarray) -> Array:
        """Nearest-neighbour downscale of (B, H, W, 1) masks to the latent grid, as torch's 'nearest'."""
        f = self.vae_scale_factor
        small = masks[:, ::f, ::f, :]
        return self.backend.latent_from_numpy(np.ascontiguousarray(small.transpose(0, 3, 1, 2)))

    def _blend_known_region(self, image_latent: Array, mask_latent: Array, eps: Array, stop: int | None = None):
        """Latent blending (any model): after step i the known region is the image re-noised to step i + 1;
        after the last step that runs (``stop`` - 1 with denoising_end, as diffusers) the image itself."""
        scheduler = self.scheduler
        keep = mask_latent * -1.0 + 1.0
        last = (len(scheduler.timesteps) if stop is None else stop) - 1

        def after_step(i: int, latent: Array) -> Array:
            known = image_latent if i >= last else scheduler.add_noise(image_latent, eps, i + 1)
            return known * keep + latent * mask_latent

        return after_step

    def walk(self, prompt: PromptType, image: Any, walk_type: str | WalkType | Sequence[str | WalkType],
             image_height: int = 512, image_width: int = 512, height_translation_per_step: int = 64,
             width_translation_per_step: int = 64, translation_factor: float | None = None,
             num_inpainting_steps: int = 4, interpolation_steps: int = 60, num_inference_steps: int = 50,
             start_step: int | None = None, strength: float | None = None, guidance_scale: float = 7.5,
             guidance_rescale: float = 0.0, negative_prompt: PromptType | None = None, seed: int | None = None,
             mode: str = "auto", callback_on_step_end: StepCallback | list | None = None) -> list[Image.Image]:
        """An outpainting animation: ``num_inpainting_steps`` times, move the camera (pan up/down/left/right,
        or zoom out with "backward") and paint what comes into view, then add ``interpolation_steps``
        frames that slide or zoom from the old view to the new one.

        ``prompt``, ``negative_prompt`` and ``walk_type`` may be one value or one per step. "forward"
        (zoom in) is a backward walk played in reverse, so it cannot be mixed with other types.
        ``translation_factor`` in (0, 1) sets both translations as fractions of the image size.
        Returns ``num_inpainting_steps * interpolation_steps`` PIL frames.
        """
        n = inputs.positive_int(num_inpainting_steps, "num_inpainting_steps")
        frames_per_step = inputs.positive_int(interpolation_steps, "interpolation_steps")
        self.validate_size(image_height, image_width)
        prompts = self._walk_steps(prompt, n, "prompt")
        negatives = [None] * n if negative_prompt is None else self._walk_steps(negative_prompt, n, "negative_prompt")
        walks = [parse_walk_type(w) for w in self._walk_steps(walk_type, n, "walk_type")]
        forward = [w == WalkType.FORWARD for w in walks]
        if any(forward) and not all(forward):
            raise ValueError("'forward' (zoom in) is a backward walk played in reverse and cannot be mixed with "
                             "other walk types; make separate walks")
        if all(forward):
            walks = [WalkType.BACKWARD] * n
        if translation_factor is not None:
            if not 0.0 < float(translation_factor) < 1.0:
                raise ValueError(f"translation_factor must be in (0, 1), got {translation_factor}")
            height_translation_per_step = int(image_height * translation_factor)
            width_translation_per_step = int(image_width * translation_factor)
        ht, wt = int(height_translation_per_step), int(width_translation_per_step)
        self._check_translations(walks, ht, wt, image_height, image_width)
        current = inputs.load_pixels(image, (image_height, image_width))
        current_image = Image.fromarray((current[0] * 255).round().astype(np.uint8))
        step_seeds = inputs.make_rng(seed).integers(0, 2**31 - 1, size=n)
        frames: list[Image.Image] = []
        with progress_bar(n, "walk", self.progress, unit="frame") as bar:
            for k in range(n):
                walk = walks[k]
                if walk == WalkType.BACKWARD:
                    source, mask = shrink_and_mask(current_image, (wt, ht))
                else:
                    shift = ht if walk in (WalkType.UP, WalkType.DOWN) else wt
                    source, mask = shift_and_mask(current_image, walk, shift)
                painted = self(prompts[k], source, mask, num_inference_steps=num_inference_steps,
                               start_step=start_step, strength=strength, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                               negative_prompt=negatives[k], seed=int(step_seeds[k]), mode=mode, output_type="pil",
                               callback_on_step_end=callback_on_step_end)[0]
                if self._interrupted:
                    break
                if walk == WalkType.BACKWARD:
                    frames += zoom_out_frames(current_image, painted, (wt, ht), frames_per_step)
                else:
                    frames += pan_frames(current_image, painted, walk, shift, frames_per_step)
                current_image = painted
                bar.update(1)
        return frames[::-1] if all(forward) else frames

    @staticmethod
    def _walk_steps(value: Any, n: int, name: str) -> list:
        one = isinstance(value, WalkType) or not isinstance(value, (list, tuple))
        return [value] * n if one else inputs.per_step(value, n, name, "num_inpainting_steps")

    @staticmethod
    def _check_translations(walks: list[WalkType], ht: int, wt: int, height: int, width: int) -> None:
        for walk in set(walks):
            if walk == WalkType.BACKWARD:
                if not (0 < 2 * ht < height and 0 < 2 * wt < width):
                    raise ValueError(f"a zoom-out border of {wt}x{ht} px per side must be positive and leave part of "
                                     f"the {width}x{height} image")
            else:
                shift, size = (ht, height) if walk in (WalkType.UP, WalkType.DOWN) else (wt, width)
                if not 0 < shift < size:
                    raise ValueError(f"a {walk.value} translation of {shift} px must be between 1 and {size - 1}")
