"""The interface pipelines use to run the networks, whatever the framework.

Pipelines and samplers never import MLX or torch: they hold "native" arrays (the
backend's own type and internal layout) and use only arithmetic on them plus these
methods. Latents cross the public API in diffusers' layout, (B, C, h, w), as numpy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from ..conditioning import Conditioning, as_conditioning
from ..deep_cache import DeepCacheConfig, DeepCacheRun
from ..token_merging import TokenMergeState, TokenMergingConfig

Array = Any  # a backend-native array


def as_numpy(array: Any) -> np.ndarray:
    """numpy, an ``mx.array`` or a torch tensor (any device, requiring grad or not) -> float32 numpy."""
    if hasattr(array, "detach"):
        array = array.detach().float().cpu().numpy()
    return np.asarray(array, dtype=np.float32)

# Optional capabilities a backend may declare (``Backend.capabilities``); pipelines ask, never probe.
COMPILE = "compile"  # fused UNet graphs
QUANTIZE = "quantize"  # low-bit Linear layers
CPU_STREAMS = "cpu_streams"  # independent work on several CPU cores at once


@dataclass(frozen=True)
class RunSettings:
    """How a pipeline wants the shared networks to run. Each pipeline owns one; the backend applies it
    for the duration of that pipeline's call and restores the previous one after, so pipelines sharing
    components never change each other's settings."""

    attention_chunk: int | None = None  # query tokens per attention slice (None: all at once)
    motion_norm_per_frame: bool = False  # AnimateDiff motion GroupNorm per frame (original repo) or across
    compile: bool = False  # run the UNet as a compiled graph (needs COMPILE)
    cpu_streams: int | None = None  # CPU streams (None: the backend's default; needs CPU_STREAMS)
    bounded_unet_run_ahead: bool = True  # MLX's CPU build: UNet passes allocate ahead at most its VAE headroom
    vae_run_ahead_by_size: bool = True  # MLX's CPU build: VAE passes run ahead by a few feature maps (cpu_memory)
    deep_cache: DeepCacheConfig | None = None  # reuse deep UNet features across evaluations (deep_cache.py)
    token_merging: TokenMergingConfig | None = None  # ToMe in the transformer blocks (token_merging.py)
    unet_batch_size: int | None = None  # samples per UNet pass, one pass after the other (None: the whole batch)


class Backend(ABC):
    name: str = ""
    native_output_type: str = ""  # output_type that returns the framework's own arrays ("mlx", "pt")
    capabilities: frozenset[str] = frozenset()  # of COMPILE, QUANTIZE, CPU_STREAMS

    # Configs of the loaded networks (see mlx_stablefused.config).
    text_config: Any
    unet_config: Any
    vae_config: Any

    @abstractmethod
    def encode_text(self, token_ids: np.ndarray) -> Array:
        """(B, 77) int ids -> (B, 77, D) last hidden state, in the model dtype."""

    @property
    def token_embedding_width(self) -> int:
        """The width of the text encoder's token embeddings (what a textual-inversion vector must have)."""
        return int(self.text_config.hidden_size)

    def token_embedding_width_of(self, component: str) -> int:
        """The token-embedding width of text encoder ``component`` (SDXL: ``text_encoder_2`` too)."""
        return int(self.configs[component].hidden_size)

    def set_token_embeddings_from(self, first_id: int, vectors: np.ndarray, component: str = "text_encoder") -> None:
        """Textual inversion: token embedding rows ``first_id`` onward of text encoder ``component`` become
        ``vectors`` (n, D) (rows after them are dropped, as diffusers' ``resize_token_embeddings`` does); rows
        before are kept."""
        raise NotImplementedError(f"the {self.name} backend cannot add token embeddings")

    def encode_text_states(self, token_ids: np.ndarray, component: str = "text_encoder",
                           hidden_state: int = -2) -> tuple[Array, Array]:
        """(B, 77) ids through text encoder ``component`` -> (its ``hidden_states[hidden_state]``, (B, 77, D),
        SDXL's penultimate layer by default; its pooled embedding (B, D'): ``text_embeds`` for an encoder with
        a projection, else the pooled EOS state), in the model dtype."""
        raise NotImplementedError(f"the {self.name} backend has no hidden-state text encoding")

    motion_config: Any = None  # the motion adapter's config when the UNet is a motion UNet
    is_video_unet: bool = False  # a motion UNet or a UNet3D: takes (B, C, F, h, w) latents

    @abstractmethod
    def unet(self, latent: Array, timestep: float, conditioning: Conditioning | Array) -> Array:
        """Noise (or v) prediction for native ``latent`` (float32) at training time ``timestep``; float32 out.

        ``conditioning``: a ``Conditioning`` of the same batch (a bare text embedding is accepted too).
        Its ``image_channels`` are concatenated to the input's channels. A video latent (5-D) runs every
        frame through the UNet with one text embedding per video.
        """

    def in_unet_passes(self, unet_pass: Any, latent: Array, timestep: float,
                       conditioning: Conditioning | Array) -> Array:
        """``unet_pass(latent, timestep, conditioning)`` over at most ``settings.unet_batch_size`` samples at a time,
        each part computed before the next is built: the low-memory preset's guidance halves one after the
        other, so a step holds one sample's activations (each sample's numbers are its own: exact).
        One pass over the whole batch when unset."""
        cond = as_conditioning(conditioning)
        size, total = self.settings.unet_batch_size, int(latent.shape[0])
        if size is None or total <= size or cond.batch_size != total:
            return unet_pass(latent, timestep, cond)
        starts = range(0, total, size)
        outs = []
        for start, part in zip(starts, cond.split([min(size, total - s) for s in starts])):
            outs.append(unet_pass(latent[start:start + size], timestep, part))
            self.evaluate(outs[-1])
        return self.concat(outs)

    @staticmethod
    def unet_keywords(cond: Conditioning, cast: Any) -> dict[str, Any]:
        """The UNet module's optional inputs under diffusers' keyword names, each through ``cast``
        (to the model dtype)."""
        extra: dict[str, Any] = {}
        if cond.down_block_residuals is not None:
            extra["down_block_additional_residuals"] = [cast(r) for r in cond.down_block_residuals]
        if cond.mid_block_residual is not None:
            extra["mid_block_additional_residual"] = cast(cond.mid_block_residual)
        if (cond.pooled_text is None) != (cond.time_ids is None):
            raise ValueError("pooled text embeddings and time ids go together (SDXL's added conditioning)")
        if cond.pooled_text is not None:
            extra["added_cond_kwargs"] = {"text_embeds": cast(cond.pooled_text), "time_ids": cast(cond.time_ids)}
        if cond.ip_hidden_states is not None:
            extra["ip_hidden_states"] = cast(cond.ip_hidden_states)
        return extra

    @staticmethod
    def frames_into_batch(extra: dict[str, Any]) -> dict[str, Any]:
        """``unet_keywords`` of a video: its ControlNet residuals (B, F, ...) as the UNet's frame-minor batch."""
        out = dict(extra)
        if "down_block_additional_residuals" in out:
            out["down_block_additional_residuals"] = [r.reshape(-1, *r.shape[2:])
                                                      for r in out["down_block_additional_residuals"]]
            mid = out["mid_block_additional_residual"]
            out["mid_block_additional_residual"] = mid.reshape(-1, *mid.shape[2:])
        return out

    def controlnet(self, module: Any, latent: Array, timestep: float, conditioning: Conditioning, image: Array,
                   scale: float, guess_mode: bool = False) -> tuple[tuple[Array, ...], Array]:
        """A ControlNet's residuals (down tuple, mid) for native ``latent`` and ``conditioning`` (text, SDXL's
        pooled text and time ids) and the native control ``image`` (one per latent row; per frame for video).
        For a video latent the residuals keep the video's layout, one per video in the batch (as the
        ``Conditioning`` holds them), frames inside; ``unet`` puts the frames into its batch."""
        raise NotImplementedError(f"the {self.name} backend has no ControlNet support")

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

    def latent_to_public(self, latent: Array) -> Array:
        """A native latent as the public API hands it out: a native array in diffusers' layout,
        (B, C, h, w) or (B, C, F, h, w). Backends whose own layout differs override this with a view."""
        return self.from_numpy(self.latent_to_numpy(latent))

    def latent_from_public(self, latent: Any) -> Array:
        """A latent in diffusers' layout (numpy, a native array, a torch tensor) -> native float32."""
        return self.latent_from_numpy(as_numpy(latent))

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

    def all_finite(self, x: Array) -> bool:
        """Whether every value of ``x`` is finite (one reduction; backends override with a native one)."""
        return bool(np.isfinite(self.to_numpy(x)).all())

    @abstractmethod
    def latent_shape(self, latent: Array) -> tuple[int, ...]:
        """The shape of a native latent in diffusers' layout, (B, C, h, w) or (B, C, F, h, w); no copy."""

    frame_axis: int = 2  # where a native video latent keeps its frames

    def take_frames(self, latent: Array, start: int, stop: int) -> Array:
        """Frames ``start:stop`` of a native video latent (a view where the framework allows)."""
        index = (slice(None),) * self.frame_axis + (slice(start, stop),)
        return latent[index]

    @abstractmethod
    def pad_frames(self, latent: Array, before: int, after: int) -> Array:
        """A native video latent with ``before``/``after`` zero frames added."""

    def frame_weights(self, weights: np.ndarray, ndim: int) -> Array:
        """Per-frame weights (F,) as a native array that broadcasts against a ``ndim``-D video latent."""
        shape = [1] * ndim
        shape[self.frame_axis] = len(weights)
        return self.from_numpy(np.asarray(weights, np.float32).reshape(shape))

    def load_network(self, root: Any, name: str, description: Any, files: Any = None) -> Any:
        """Component ``name`` of ``description`` from the diffusers folder ``root`` as this backend's module,
        in the model's dtype on its device, strictly checked (a network beside the model: a preview decoder,
        a ControlNet); ``files`` (``sources.ComponentFiles``): its config and weights stored elsewhere."""
        raise NotImplementedError(f"the {self.name} backend cannot load extra networks")

    # ---------------------------------------------------------------------------- run settings
    def supports(self, capability: str) -> bool:
        return capability in self.capabilities

    @property
    def settings(self) -> RunSettings:
        """The settings in force now."""
        return getattr(self, "_settings", RunSettings())

    def apply_settings(self, settings: RunSettings) -> None:
        """Make ``settings`` the ones in force (only what changed is touched)."""
        old = self.settings
        if settings.attention_chunk != old.attention_chunk:
            self.set_attention_chunk(settings.attention_chunk)
        if settings.motion_norm_per_frame != old.motion_norm_per_frame and self.motion_config is not None:
            self.set_motion_norm_per_frame(settings.motion_norm_per_frame)
        if settings.token_merging != old.token_merging:
            self._token_merge = self.set_token_merging(settings.token_merging)
        self._settings = settings

    # ------------------------------------------------------------- UNet evaluations (DeepCache, ToMe)
    _token_merge: TokenMergeState | None = None  # while token merging is on
    _evaluation: tuple[int, DeepCacheRun | None] | None = None  # the UNet evaluation in progress

    def set_token_merging(self, config: TokenMergingConfig | None) -> TokenMergeState | None:
        """Give the UNet's transformer blocks ToMe with ``config`` (None: take it away); returns their shared state."""
        raise NotImplementedError(f"the {self.name} backend has no token merging")

    @contextmanager
    def evaluation(self, index: int, deep_cache: DeepCacheRun | None = None) -> Iterator[None]:
        """Every UNet module call in the block belongs to evaluation ``index`` of the generation: DeepCache's
        schedule (``deep_cache``) and ToMe's random picks follow it."""
        previous = self._evaluation
        self._evaluation = (index, deep_cache)
        if deep_cache is not None:
            deep_cache.begin_evaluation(index)
        if self._token_merge is not None:
            self._token_merge.evaluation = index
        try:
            yield
        finally:
            self._evaluation = previous

    def unet_call_keywords(self, input_shape: tuple[int, ...], latent_size: tuple[int, int]) -> dict[str, Any]:
        """What one UNet module call on an input of ``input_shape`` (spatial ``latent_size``) takes beyond the
        plain inputs: DeepCache's slot during an evaluation; ToMe learns the latent size."""
        if self._token_merge is not None:
            self._token_merge.latent_size = tuple(latent_size)
        if self._evaluation is None or self._evaluation[1] is None:
            return {}
        return {"deep_cache": self._evaluation[1].slot(input_shape)}

    @contextmanager
    def using(self, settings: RunSettings) -> Iterator[None]:
        """``settings`` for the duration of a block; the previous ones after it, also on error."""
        previous = self.settings
        self.apply_settings(settings)
        try:
            yield
        finally:
            self.apply_settings(previous)

    def evaluate(self, *arrays: Array) -> None:
        """Force computation (lazy frameworks), so progress bars and timings mean something."""

    def set_attention_chunk(self, chunk: int | None) -> None:
        """Attend in query slices of ``chunk`` tokens (None: whole) to bound attention memory."""

    def to_device(self, device: str) -> None:
        """Run on ``device`` from now on (what ``pipe.to(device)`` asks)."""
        raise NotImplementedError(f"the {self.name} backend cannot change device after loading")

    def release_text_encoder(self) -> bool:
        """Free the text encoder's weights until the next prompt (if the backend can re-read them)."""
        return False

    def release_unet(self) -> bool:
        """Free the UNet's weights until its next use (if the backend can re-read them)."""
        return False

    def available_memory(self) -> int | None:
        """Bytes a generation may still use on the device in use (None: unknown). Default: free RAM."""
        from ..memory_estimate import system_available_memory

        return system_available_memory()

    @property
    def fused_attention(self) -> bool:
        """Whether attention runs without materialising the (queries x keys) score matrix here."""
        return False

    @property
    def attention_slice_bytes(self) -> int | None:
        """The most bytes of scores one attention slice holds here whatever a pipeline's slicing asks
        (None: the pipeline's slicing decides)."""
        return None

    @property
    def dtype_bytes(self) -> int:
        """Bytes per element of the networks' compute dtype."""
        dtype = getattr(self, "dtype", None)
        return int(getattr(dtype, "itemsize", None) or getattr(dtype, "size", 4))

    def set_motion_norm_per_frame(self, per_frame: bool) -> None:
        """Motion-module GroupNorm statistics per frame (original AnimateDiff) or across frames (diffusers)."""
        raise NotImplementedError(f"the {self.name} backend has no motion modules")

    # ------------------------------------------------------------------------------ IP-Adapter
    ip_adapter: Any = None  # the loaded IP-Adapter (pipelines/ip_adapter_loader.py), shared like the weights

    def ip_adapter_host(self) -> Any:
        """How an IP-Adapter attaches to this backend's UNet and runs its image encoder (backends/*/ip_adapter.py)."""
        raise NotImplementedError(f"the {self.name} backend has no IP-Adapter support")

    # ------------------------------------------------------------------------------------ LoRA
    def lora_host(self) -> Any:
        """The backend's ``lora.LoRAHost``: how LoRA terms attach to its layers (``backends/*/lora.py``)."""
        raise NotImplementedError(f"the {self.name} backend has no LoRA support")

    def lora_state(self, model: str = "the loaded model") -> Any:
        """The LoRA adapters of these networks (a ``lora.LoRAState``, made on first use): they live with the
        loaded weights, so every pipeline sharing this backend sees them."""
        if getattr(self, "_lora", None) is None:
            from ..lora import LoRAState

            self._lora = LoRAState(self.lora_host(), model)
        return self._lora

    @property
    def lora_fused_components(self) -> set[str]:
        """Components whose weights a fused LoRA changed (they no longer equal the files)."""
        state = getattr(self, "_lora", None)
        return set() if state is None else state.changed_components
