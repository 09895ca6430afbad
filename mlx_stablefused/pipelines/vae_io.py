"""The VAE side of every pipeline: pixels to scaled latents, latents to images of any output type.

One place for the scaling/shift factors, tiling, decode batching and output formats, so image,
walk and video pipelines decode the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backends.base import Array, Backend
from ..errors import NonFiniteError
from ..progress import progress_bar
from ..utils.images import denormalize, normalize, numpy_to_pil
from .denoise import non_finite_message
from .vae_tiling import TileSpec, tiled_decode, tiled_encode


@dataclass(frozen=True)
class VAEIO:
    backend: Backend
    tiling: TileSpec | None = None  # decode/encode on overlapping tiles beyond this size
    decode_batch_size: int | None = None  # images decoded at a time (None: the whole batch)
    progress: bool = False  # a decode bar when the batch is decoded in several parts (video frames)

    # ------------------------------------------------------------------------------- encode
    def encode(self, pixels: np.ndarray) -> Array:
        """(B, H, W, 3) float pixels in [0, 1] -> scaled posterior-mean latents (native)."""
        mean = self._encode_mean(normalize(pixels))
        cfg = self.backend.vae_config
        if cfg.shift_factor:
            mean = mean - cfg.shift_factor
        return mean * cfg.scaling_factor

    def _encode_mean(self, images: np.ndarray) -> Array:
        """(B, H, W, 3) numpy in [-1, 1] -> unscaled native posterior mean, tiled when enabled."""
        backend, spec = self.backend, self.tiling
        if spec is None or max(images.shape[1:3]) <= spec.sample_size:
            return backend.vae_encode(backend.images_from_numpy(images))[0]

        def encode(tile: np.ndarray) -> np.ndarray:
            mean = backend.vae_encode(backend.images_from_numpy(np.ascontiguousarray(tile.transpose(0, 2, 3, 1))))[0]
            return backend.latent_to_numpy(mean).transpose(0, 2, 3, 1)

        mean = tiled_encode(np.ascontiguousarray(images.transpose(0, 3, 1, 2)), encode, spec)
        return backend.latent_from_numpy(np.ascontiguousarray(mean.transpose(0, 3, 1, 2)))

    # ------------------------------------------------------------------------------- decode
    def decode(self, latents: Array | np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """Scaled latents (native, or numpy (B, C, h, w)) -> (B, H, W, 3) float32 numpy in [0, 1]."""
        backend = self.backend
        if isinstance(latents, np.ndarray):
            latents = backend.latent_from_numpy(latents)
        cfg = backend.vae_config
        n = latents.shape[0]
        step = batch_size or self.decode_batch_size or n
        if self.decode_batch_size:  # enable_slicing() (and the low-memory preset) caps any asked batch
            step = min(step, self.decode_batch_size)
        chunks = []
        with progress_bar(n, "decoding", self.progress and n > step, unit="image") as bar:
            for s in range(0, n, step):
                z = latents[s:s + step] * (1.0 / cfg.scaling_factor)
                if cfg.shift_factor:
                    z = z + cfg.shift_factor
                chunks.append(self._decode_unscaled(z))
                bar.update(min(step, n - s))
        images = np.concatenate(chunks, axis=0)
        if not np.isfinite(images).all():  # an fp16 VAE overflow would otherwise give a black image
            raise NonFiniteError(non_finite_message("the decoded images", None, None, None, backend))
        return denormalize(images).astype(np.float32)

    def _decode_unscaled(self, z: Array) -> np.ndarray:
        backend, spec = self.backend, self.tiling
        if spec is None or max(backend.latent_shape(z)[2:]) <= spec.latent_size:
            return backend.images_to_numpy(backend.vae_decode(z))
        return tiled_decode(backend.latent_to_numpy(z),
                            lambda t: backend.images_to_numpy(backend.vae_decode(backend.latent_from_numpy(t))), spec)

    # ------------------------------------------------------------------------------- output
    def format(self, images: np.ndarray, output_type: str) -> Any:
        """(..., H, W, 3) numpy in [0, 1] as "np", "pil" (lists follow the leading axes) or native arrays."""
        if output_type == "np":
            return images
        if output_type == "pil":
            if images.ndim == 4:
                return numpy_to_pil(images)
            return [self.format(row, "pil") for row in images]
        if output_type == "pt" and self.backend.native_output_type != "pt":  # torch on another backend
            import torch

            return torch.from_numpy(np.ascontiguousarray(np.moveaxis(images, -1, -3)))
        flat = images.reshape(-1, *images.shape[-3:])
        native = self.backend.images_from_numpy(flat)
        return native.reshape(*images.shape[:-3], *native.shape[1:]) if images.ndim > 4 else native

    def output(self, latents: Array, output_type: str, batch_size: int | None = None) -> Any:
        """Final latents -> ``output_type``: images, or "latent" (numpy in diffusers' layout).

        Video latents (5-D) decode frame by frame: "np" (B, F, H, W, 3), "pil" one frame list per video.
        """
        backend = self.backend
        if output_type == "latent":
            return backend.latent_to_numpy(latents)
        shape = backend.latent_shape(latents)
        if len(shape) == 5:
            b, c, frames, h, w = shape
            flat = backend.latent_to_numpy(latents).transpose(0, 2, 1, 3, 4).reshape(b * frames, c, h, w)
            images = self.decode(flat, batch_size)
            return self.format(images.reshape(b, frames, *images.shape[1:]), output_type)
        return self.format(self.decode(latents, batch_size), output_type)

    def history_output(self, history: list[Array], output_type: str) -> Any:
        """Every step's latent per prompt: "latent" (B, steps+1, C, h, w), "np" (B, steps+1, H, W, 3), "pil"
        one list per prompt, or native images (B, steps+1, H, W, 3)."""
        if output_type == "latent":
            return np.stack([self.backend.latent_to_numpy(x) for x in history], axis=1)
        frames = np.stack([self.decode(x) for x in history], axis=1)
        return self.format(frames, output_type)
