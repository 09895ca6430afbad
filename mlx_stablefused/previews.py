"""Cheap looks at latents while they are denoised: live previews on the step-callback API, and decoders for
``return_latent_history`` videos (stablefused's denoising-process videos) that cost a fraction of the VAE.

Three decoders, by name (``PREVIEW_DECODERS``):
* ``"vae"``: the model's own VAE (exact; what ``return_latent_history`` used before and still does by default);
* ``"taesd"``: the tiny autoencoder (``pipe.load_tiny_autoencoder("madebyollin/taesd")`` first): close to the
  VAE's image at a small fraction of its cost;
* ``"linear"``: a fixed 4x3 matrix from latent channels to RGB (no network at all), upsampled by nearest
  neighbour to the image's size: colours and layout only.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
from PIL import Image

from .backends.base import Array, as_numpy
from .tiny_autoencoder import has_tiny_autoencoder, tiny_decode
from .utils.images import image_grid, numpy_to_pil

PREVIEW_DECODERS = ("vae", "taesd", "linear")

# SD 1.x latent channel -> (R, G, B): AUTOMATIC1111's "Approx cheap" preview (stable-diffusion-webui,
# modules/sd_vae_approx.py, cheap_approximation; ComfyUI's SD15 latent_rgb_factors until it refitted them),
# fitted by Keturn for SD 1.4 (discuss.huggingface.co/t/decoding-latents-to-rgb-without-upscaling/23204/2).
# It reads the scaled latents the UNet works on and gives roughly [-1, 1]; both UIs then map (x + 1) / 2.
SD15_LATENT_RGB_FACTORS = np.array([
    [0.298, 0.207, 0.208],
    [0.187, 0.286, 0.173],
    [-0.158, 0.189, 0.264],
    [-0.184, -0.271, -0.473],
], dtype=np.float32)


def latents_to_rgb(latents: Any, factors: np.ndarray = SD15_LATENT_RGB_FACTORS, upscale: int = 1) -> np.ndarray:
    """The linear approximation: scaled latents (B, C, h, w) in diffusers' layout (numpy or any native array)
    -> (B, h * upscale, w * upscale, 3) float32 in [0, 1]. Backend-neutral (numpy)."""
    z = as_numpy(latents)
    if z.ndim != 4 or z.shape[1] != factors.shape[0]:
        raise ValueError(f"latents must be (B, {factors.shape[0]}, h, w) for these factors, got {z.shape}")
    rgb = np.einsum("bchw,cr->bhwr", z, factors.astype(np.float32))
    rgb = np.clip((rgb + 1.0) / 2.0, 0.0, 1.0).astype(np.float32)
    if upscale > 1:
        rgb = rgb.repeat(upscale, axis=1).repeat(upscale, axis=2)
    return rgb


def check_preview_decoder(pipe: Any, decoder: str, what: str = "history_decoder") -> None:
    """Refuse, before work, a decoder name that does not exist or a tiny autoencoder that is not loaded."""
    if decoder not in PREVIEW_DECODERS:
        raise ValueError(f"{what}={decoder!r}: expected one of {', '.join(map(repr, PREVIEW_DECODERS))}")
    if decoder == "taesd" and not has_tiny_autoencoder(pipe.backend):
        raise ValueError(f"{what}='taesd' needs a tiny autoencoder: call pipe.load_tiny_autoencoder() first "
                         "(default 'madebyollin/taesd', or a local AutoencoderTiny folder)")


def decode_latents(pipe: Any, latents: Array, decoder: str) -> np.ndarray:
    """Native scaled latents (B, C, h, w) -> (B, H, W, 3) float32 numpy in [0, 1], by ``decoder``."""
    backend = pipe.backend
    if decoder == "taesd":
        return tiny_decode(backend, latents)
    if decoder == "linear":
        return latents_to_rgb(backend.latent_to_numpy(latents), upscale=pipe.vae_scale_factor)
    return pipe.vae_io.decode(latents)


def history_frames(pipe: Any, history: list[Array], decoder: str) -> np.ndarray:
    """Every step's latents -> (B, steps+1, H, W, 3) float32 numpy in [0, 1]."""
    if decoder == "vae":  # exactly the frames the VAE path has always given
        return np.stack([pipe.vae_io.decode(x) for x in history], axis=1)
    # One step at a time, as the VAE path: memory stays that of one step's batch however long the history.
    return np.stack([decode_latents(pipe, x, decoder) for x in history], axis=1)


class PreviewCallback:
    """A ``callback_on_step_end`` that shows the latents every ``every`` steps: ``on_preview(step, image)`` gets
    the step index and one PIL image (a batch side by side; video frames in a row per video).

    ``method``: "taesd" (needs ``pipe.load_tiny_autoencoder()`` before the call: checked before the first step),
    "linear" (no network) or "vae" (exact, as costly as the final decode)."""

    def __init__(self, on_preview: Callable[[int, Image.Image], Any], every: int = 1, method: str = "taesd") -> None:
        if not callable(on_preview):
            raise TypeError("on_preview must be a callable (step, PIL image)")
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        if method not in PREVIEW_DECODERS:
            raise ValueError(f"method={method!r}: expected one of {', '.join(map(repr, PREVIEW_DECODERS))}")
        self.on_preview, self.every, self.method = on_preview, every, method

    def check_pipeline(self, pipe: Any) -> None:
        check_preview_decoder(pipe, self.method, "PreviewCallback method")

    def __call__(self, pipe: Any, step: int, timestep: float, tensors: dict) -> None:
        if (step + 1) % self.every:
            return None
        latents = as_numpy(tensors["latents"])
        rows = 1
        if latents.ndim == 5:  # video (B, C, F, h, w): frames in a row per video
            rows, by_frame = latents.shape[0], latents.transpose(0, 2, 1, 3, 4)
            latents = by_frame.reshape(-1, *by_frame.shape[2:])
        images = numpy_to_pil(decode_latents(pipe, pipe.backend.latent_from_numpy(latents), self.method))
        self.on_preview(step, image_grid(images, rows, len(images) // rows))
        return None


__all__ = ["PREVIEW_DECODERS", "SD15_LATENT_RGB_FACTORS", "latents_to_rgb", "decode_latents", "history_frames",
           "check_preview_decoder", "PreviewCallback"]
