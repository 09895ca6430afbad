"""Inpainting: repaint the white part of a mask. 9-channel inpainting UNets get the mask and the
masked image as extra input channels; ordinary 4-channel models blend the known region back in
after every step (latent blending), so any model can inpaint."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import UnsupportedModelError
from .base import Array, PromptType, load_pixels
from .image_to_image import ImageToImageDiffusion

MODES = ("auto", "unet", "blend")


class InpaintDiffusion(ImageToImageDiffusion):
    def __call__(self, prompt: PromptType, image: Any, mask: Any, image_height: int | None = None,
                 image_width: int | None = None, num_inference_steps: int = 50, start_step: int | None = None,
                 guidance_scale: float = 7.5, guidance_rescale: float = 0.0,
                 negative_prompt: PromptType | None = None, output_type: str = "pil",
                 return_latent_history: bool = False, strength: float | None = None,
                 noise: np.ndarray | None = None, seed: int | None = None, num_images_per_prompt: int = 1,
                 mode: str = "auto") -> Any:
        """Repaint where ``mask`` is white (>= 0.5 after scaling to [0, 1]); keep where it is black.

        ``image``/``mask``: paths, PIL images (any mode; the mask is read as grayscale), lists, or
        numpy arrays. Without ``image_height``/``image_width`` they keep their size (a multiple of 8,
        equal for both). Start: ``start_step``/``strength`` as in image-to-image; at the default
        (start_step 0) the masked region starts from pure noise. ``mode``: "unet" (9-channel
        inpainting UNet), "blend" (latent blending, any model), or "auto" (by the UNet's channels).
        """
        self._check_output_type(output_type)
        self.validate_steps(num_inference_steps)
        use_unet = self._resolve_mode(mode)
        prompts, negatives = self.expand_prompts(prompt, negative_prompt, num_images_per_prompt)
        num_prompts = len(prompts) // num_images_per_prompt
        size = self._requested_size(image_height, image_width)
        pixels = self.preprocess_image(image, size)
        masks = self.preprocess_mask(mask, pixels.shape[1:3], resize=size is not None)
        pixels = self.match_batch(pixels, num_prompts, num_images_per_prompt, "image")
        masks = self.match_batch(masks, num_prompts, num_images_per_prompt, "mask")
        self.scheduler.set_timesteps(num_inference_steps)
        start = self.start_index(num_inference_steps, start_step, strength)
        embedding = self.prompt_to_embedding(prompts, negatives)
        latents = self.inpaint_latents(embedding, pixels, masks, start, guidance_scale, guidance_rescale,
                                       use_unet, noise=noise, seed=seed,
                                       return_latent_history=return_latent_history)
        return self.resolve_output(latents, output_type, return_latent_history)

    generate = __call__

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
        values = load_pixels(mask, size if resize else None, mode="L")
        if values.shape[1:3] != tuple(size):
            raise ValueError(f"mask is {values.shape[2]}x{values.shape[1]} but the image is {size[1]}x{size[0]} "
                             "(width x height); they must match (or pass image_height/image_width to resize both)")
        return (values >= 0.5).astype(np.float32)

    def mask_to_latent(self, masks: np.ndarray) -> Array:
        """Nearest-neighbour downscale of (B, H, W, 1) masks to the latent grid, as torch's 'nearest'."""
        f = self.vae_scale_factor
        small = masks[:, ::f, ::f, :]
        return self.backend.latent_from_numpy(np.ascontiguousarray(small.transpose(0, 3, 1, 2)))

    def inpaint_latents(self, embedding: Array, pixels: np.ndarray, masks: np.ndarray, start: int,
                        guidance_scale: float, guidance_rescale: float, use_unet: bool,
                        noise: np.ndarray | None = None, seed: int | None = None,
                        return_latent_history: bool = False) -> list[Array]:
        backend, scheduler = self.backend, self.scheduler
        rng = self.make_rng(seed)
        image_latent = self.pixels_to_latent(pixels)
        mask_latent = self.mask_to_latent(masks)
        public = backend.latent_to_numpy(image_latent).shape
        eps = backend.latent_from_numpy(self.given_or_random(noise, public, rng, "noise"))
        if start == 0:
            x = eps * float(scheduler.init_noise_sigma)  # the masked region starts from pure noise
        else:
            x = scheduler.add_noise(image_latent, eps, start)
        conditioning, after_step = None, None
        if use_unet:
            masked = pixels * (1.0 - masks) + 0.5 * masks  # masked pixels become 0 in [-1, 1]
            conditioning = backend.concat_channels([mask_latent, self.pixels_to_latent(masked)])
        else:
            keep = mask_latent * -1.0 + 1.0
            last = len(scheduler.timesteps) - 1

            def after_step(i: int, latent: Array) -> Array:
                known = image_latent if i >= last else scheduler.add_noise(image_latent, eps, i + 1)
                return known * keep + latent * mask_latent

        history = [x]
        for x in self.denoise_steps(x, embedding, guidance_scale, guidance_rescale, rng, start_step=start,
                                    conditioning=conditioning, after_step=after_step):
            if return_latent_history:
                history.append(x)
        return history if return_latent_history else [x]
