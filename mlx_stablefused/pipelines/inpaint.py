"""Inpainting: repaint the white part of a mask. 9-channel inpainting UNets get the mask and the
masked image as extra input channels; ordinary 4-channel models blend the known region back in
after every step (latent blending), so any model can inpaint."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..errors import UnsupportedModelError
from .base import Array, PromptType, load_pixels
from .image_to_image import ImageToImageDiffusion
from .walk_geometry import WalkType, pan_frames, parse_walk_type, shift_and_mask, shrink_and_mask, zoom_out_frames

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

        return self.run_sampler(x, embedding, guidance_scale, guidance_rescale, rng, start, return_latent_history,
                                conditioning=conditioning, after_step=after_step)

    def walk(self, prompt: PromptType, image: Any, walk_type: str | WalkType | Sequence[str | WalkType],
             image_height: int = 512, image_width: int = 512, height_translation_per_step: int = 64,
             width_translation_per_step: int = 64, translation_factor: float | None = None,
             num_inpainting_steps: int = 4, interpolation_steps: int = 60, num_inference_steps: int = 50,
             start_step: int | None = None, strength: float | None = None, guidance_scale: float = 7.5,
             guidance_rescale: float = 0.0, negative_prompt: PromptType | None = None, seed: int | None = None,
             mode: str = "auto") -> list[Image.Image]:
        """An outpainting animation: ``num_inpainting_steps`` times, move the camera (pan up/down/left/right,
        or zoom out with "backward") and paint what comes into view, then add ``interpolation_steps``
        frames that slide or zoom from the old view to the new one.

        ``prompt``, ``negative_prompt`` and ``walk_type`` may be one value or one per step. "forward"
        (zoom in) is a backward walk played in reverse, so it cannot be mixed with other types.
        ``translation_factor`` in (0, 1) sets both translations as fractions of the image size.
        Returns ``num_inpainting_steps * interpolation_steps`` PIL frames.
        """
        n = self._positive_int(num_inpainting_steps, "num_inpainting_steps")
        frames_per_step = self._positive_int(interpolation_steps, "interpolation_steps")
        self.validate_size(image_height, image_width)
        prompts = self._per_step(prompt, n, "prompt")
        negatives = [None] * n if negative_prompt is None else self._per_step(negative_prompt, n, "negative_prompt")
        walks = [parse_walk_type(w) for w in self._per_step(walk_type, n, "walk_type")]
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
        current = load_pixels(image, (image_height, image_width))
        current_image = Image.fromarray((current[0] * 255).round().astype(np.uint8))
        step_seeds = self.make_rng(seed).integers(0, 2**31 - 1, size=n)
        frames: list[Image.Image] = []
        for k in tqdm(range(n), disable=not self.progress, desc="walk"):
            walk = walks[k]
            if walk == WalkType.BACKWARD:
                source, mask = shrink_and_mask(current_image, (wt, ht))
            else:
                shift = ht if walk in (WalkType.UP, WalkType.DOWN) else wt
                source, mask = shift_and_mask(current_image, walk, shift)
            painted = self(prompts[k], source, mask, num_inference_steps=num_inference_steps, start_step=start_step,
                           strength=strength, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                           negative_prompt=negatives[k], seed=int(step_seeds[k]), mode=mode, output_type="pil")[0]
            if walk == WalkType.BACKWARD:
                frames += zoom_out_frames(current_image, painted, (wt, ht), frames_per_step)
            else:
                frames += pan_frames(current_image, painted, walk, shift, frames_per_step)
            current_image = painted
        return frames[::-1] if all(forward) else frames

    @staticmethod
    def _positive_int(value: Any, name: str) -> int:
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
        return int(value)

    @staticmethod
    def _per_step(value: Any, n: int, name: str) -> list:
        if isinstance(value, (str, WalkType)) or not isinstance(value, (list, tuple)):
            return [value] * n
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for num_inpainting_steps={n}; give one, or one per step")
        return list(value)

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
