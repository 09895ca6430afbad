"""Image-to-image: noise an image's latent part-way, then denoise it toward the prompt."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Array, BaseDiffusion, PromptType


class ImageToImageDiffusion(BaseDiffusion):
    def __call__(self, image: Any, prompt: PromptType, num_inference_steps: int = 50, start_step: int | None = None,
                 guidance_scale: float = 7.5, guidance_rescale: float = 0.0,
                 negative_prompt: PromptType | None = None, output_type: str = "pil",
                 return_latent_history: bool = False, strength: float | None = None,
                 noise: np.ndarray | None = None, seed: int | None = None, num_images_per_prompt: int = 1,
                 image_height: int | None = None, image_width: int | None = None) -> Any:
        """Re-imagine ``image`` (path, PIL, list, or NHWC numpy) following ``prompt``.

        How much of the schedule runs: ``start_step`` (stablefused: skip that many of the
        ``num_inference_steps``; more = closer to the input) or ``strength`` (diffusers: the fraction
        that runs; less = closer). Neither: start_step=0, i.e. the image only seeds the noise.
        ``noise``: the Gaussian noise added to the image latent, (B, 4, h, w) numpy; else from ``seed``.
        ``image_height``/``image_width`` resize the input; otherwise its size must be a multiple of 8.
        """
        self._check_output_type(output_type)
        self.validate_steps(num_inference_steps)
        prompts, negatives = self.expand_prompts(prompt, negative_prompt, num_images_per_prompt)
        size = self._requested_size(image_height, image_width)
        pixels = self.preprocess_image(image, size)
        pixels = self.match_batch(pixels, len(prompts) // num_images_per_prompt, num_images_per_prompt, "image")
        self.scheduler.set_timesteps(num_inference_steps)
        start = self.start_index(num_inference_steps, start_step, strength)
        embedding = self.prompt_to_embedding(prompts, negatives)
        latents = self.embedding_to_latent(embedding, self.pixels_to_latent(pixels), start, guidance_scale,
                                           guidance_rescale, noise=noise, seed=seed,
                                           return_latent_history=return_latent_history)
        return self.resolve_output(latents, output_type, return_latent_history)

    generate = __call__

    def _requested_size(self, height: int | None, width: int | None) -> tuple[int, int] | None:
        if height is None and width is None:
            return None
        if height is None or width is None:
            raise ValueError("pass both image_height and image_width to resize, or neither")
        self.validate_size(height, width)
        return int(height), int(width)

    @staticmethod
    def match_batch(pixels: np.ndarray, num_prompts: int, per_prompt: int, name: str) -> np.ndarray:
        """One image for every prompt, or one per prompt; then repeated ``per_prompt`` times."""
        if pixels.shape[0] == 1:
            return np.repeat(pixels, num_prompts * per_prompt, axis=0)
        if pixels.shape[0] != num_prompts:
            raise ValueError(f"{pixels.shape[0]} {name}s for {num_prompts} prompts; pass one {name}, "
                             f"or one per prompt")
        return np.repeat(pixels, per_prompt, axis=0)

    def embedding_to_latent(self, embedding: Array, image_latent: Array, start: int, guidance_scale: float,
                            guidance_rescale: float, noise: np.ndarray | None = None, seed: int | None = None,
                            return_latent_history: bool = False) -> list[Array]:
        """Noise ``image_latent`` to table index ``start`` and denoise from there (timesteps already set)."""
        rng = self.make_rng(seed)
        public = self.backend.latent_to_numpy(image_latent)
        eps = self.given_or_random(noise, public.shape, rng, "noise")
        x = self.scheduler.add_noise(image_latent, self.backend.latent_from_numpy(eps), start)
        return self.run_sampler(x, embedding, guidance_scale, guidance_rescale, rng, start, return_latent_history)


__all__ = ["ImageToImageDiffusion"]
