"""The interface pipelines use to run the networks, whatever the framework.

Pipelines and samplers never import MLX or torch: they hold "native" arrays (the
backend's own type and internal layout) and use only arithmetic on them plus these
methods. Latents cross the public API in diffusers' layout, (B, C, h, w), as numpy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Sequence

import numpy as np

Array = Any  # a backend-native array


class Backend(ABC):
    name: str = ""
    native_output_type: str = ""  # output_type that returns the framework's own arrays ("mlx", "pt")

    # Configs of the loaded networks (see mlx_stablefused.config).
    text_config: Any
    unet_config: Any
    vae_config: Any

    @abstractmethod
    def encode_text(self, token_ids: np.ndarray) -> Array:
        """(B, 77) int ids -> (B, 77, D) last hidden state, in the model dtype."""

    motion_config: Any = None  # the motion adapter's config when the UNet is a motion UNet
    is_video_unet: bool = False  # a motion UNet or a UNet3D: takes (B, C, F, h, w) latents

    @abstractmethod
    def unet(self, latent: Array, timestep: float, context: Array) -> Array:
        """Noise (or v) prediction for native ``latent`` (float32) at training time ``timestep``; float32 out.

        A video latent (5-D) runs every frame through the UNet with one context per video.
        """

    @abstractmethod
    def vae_decode(self, latent: Array) -> Array:
        """Unscaled native latents -> native images, float32, about [-1, 1]."""

    @abstractmethod
    def vae_encode(self, images: Array) -> tuple[Array, Array]:
        """Native images in [-1, 1] -> posterior (mean, logvar), unscaled, float32."""

    @abstractmethod
    def latent_from_numpy(self, latent: np.ndarray) -> Array:
        """(B, C, h, w) numpy, or (B, C, F, h, w) for video -> native float32 latent."""

    @abstractmethod
    def latent_to_numpy(self, latent: Array) -> np.ndarray:
        """Native latent -> (B, C, h, w) or (B, C, F, h, w) float32 numpy."""

    @abstractmethod
    def images_from_numpy(self, images: np.ndarray) -> Array:
        """(B, H, W, 3) float numpy in [-1, 1] -> native images."""

    @abstractmethod
    def images_to_numpy(self, images: Array) -> np.ndarray:
        """Native images -> (B, H, W, 3) float32 numpy."""

    @abstractmethod
    def from_numpy(self, array: np.ndarray) -> Array:
        """Any numpy array -> native array of the same shape and layout (embeddings, masks...)."""

    @abstractmethod
    def to_numpy(self, array: Array) -> np.ndarray:
        """Native array -> float32 numpy of the same shape and layout."""

    @abstractmethod
    def concat(self, arrays: Sequence[Array]) -> Array:
        """Concatenate along the batch axis."""

    @abstractmethod
    def concat_channels(self, arrays: Sequence[Array]) -> Array:
        """Concatenate latents along the channel axis (wherever the backend keeps it)."""

    @abstractmethod
    def per_sample_std(self, x: Array) -> Array:
        """Standard deviation over all but the batch axis, broadcastable against ``x``."""

    def evaluate(self, *arrays: Array) -> None:
        """Force computation (lazy frameworks), so progress bars and timings mean something."""

    def set_attention_chunk(self, chunk: int | None) -> None:
        """Attend in query slices of ``chunk`` tokens (None: whole) to bound attention memory."""

    def release_text_encoder(self) -> bool:
        """Free the text encoder's weights until the next prompt (if the backend can re-read them)."""
        return False

    def set_motion_norm_per_frame(self, per_frame: bool) -> None:
        """Motion-module GroupNorm statistics per frame (original AnimateDiff) or across frames (diffusers)."""
        raise NotImplementedError(f"the {self.name} backend has no motion modules")
