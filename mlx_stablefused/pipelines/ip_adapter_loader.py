"""diffusers' IP-Adapter methods on every pipeline (``IPAdapterMixin``'s names: ``load_ip_adapter``,
``set_ip_adapter_scale``, ``unload_ip_adapter``) and the per-call image prompt (``ip_adapter_image=``,
``ip_adapter_image_embeds=``), which rides in the ``Conditioning`` through the shared sampling core.

The adapter lives with the loaded networks (the backend), as LoRAs do: pipelines sharing components
share it. Every check runs before any work: a call's images are read and sized in ``check_image_prompt``
(step 1 of a recipe), encoded only after the prompt (step 2, ``add_image_prompt``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..conditioning import Conditioning
from ..errors import UnsupportedModelError
from ..ip_adapter import (IMAGE_ENCODER_FOLDER, IPAdapterError, IPAdapterWeights, check_encoder_fits,
                          parse_ip_adapter, read_ip_adapter_file, resolve_ip_adapter, split_state)
from ..validation import finite_float


@dataclass
class LoadedIPAdapter:
    """The IP-Adapter on a backend: its parsed weights' description, the attached host, the image encoder."""

    host: Any  # backends/*/ip_adapter.py: the projection and the attn2 layers
    origin: str
    num_tokens: int
    image_embed_dim: int
    hidden_states: bool = False  # IP-Adapter Plus: it projects the encoder's penultimate hidden states
    encoder: Any = None  # the CLIPVisionModelWithProjection module (None: loaded with image_encoder_folder=None)
    encoder_folder: Path | None = None
    scale: float = 1.0


@dataclass(frozen=True)
class ImagePrompt:
    """A call's checked image prompt: pixel values to encode, or given embeddings (numpy)."""

    pixels: np.ndarray | None = None  # (n, 3, S, S): n images for the one adapter (their tokens concatenated)
    embeds: np.ndarray | None = None  # (k, n, D) ``ip_adapter_image_embeds`` as diffusers takes them
    negative_embeds: np.ndarray | None = None


def _flatten_state_dict(state: Mapping[str, Any]) -> dict[str, Any]:
    """diffusers' in-memory form ``{"image_proj": {...}, "ip_adapter": {...}}`` (or flat prefixed keys)."""
    flat: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, Mapping):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[str(key)] = value
    return flat


def _one_adapter(value: Any, name: str) -> Any:
    """diffusers' list form (one entry per adapter) with one entry; several adapters at once are refused."""
    if not isinstance(value, (list, tuple)):
        return value
    if len(value) != 1:
        raise IPAdapterError(f"load_ip_adapter: {len(value)} entries in {name}; one IP-Adapter at a time is "
                             "supported (several at once: not yet)")
    return value[0]


class IPAdapterMixin:
    """Needs ``self.backend`` (BaseDiffusion has it)."""

    @property
    def ip_adapter(self) -> LoadedIPAdapter | None:
        """The loaded IP-Adapter (None: none)."""
        return self.backend.ip_adapter

    def load_ip_adapter(self, pretrained_model_name_or_path_or_dict: str | Path | Mapping[str, Any],
                        subfolder: str | None = None, weight_name: str | None = None,
                        image_encoder_folder: str | None = IMAGE_ENCODER_FOLDER, *,
                        local_files_only: bool = False) -> None:
        """Load an IP-Adapter (h94/IP-Adapter's layout: ``load_ip_adapter("h94/IP-Adapter", subfolder="models",
        weight_name="ip-adapter_sd15.safetensors")``; a file, a folder, a state dict, or ``"demo:ip-adapter"``,
        a random one for the offline demo model) and its image encoder
        (``image_encoder_folder`` inside ``subfolder``, as diffusers; a path with '/' is from the repo root;
        None: none, for ``ip_adapter_image_embeds`` only). Scale 1. It replaces an adapter loaded before.
        Everything is checked before the UNet changes: an adapter for another base (its cross-attention
        width), a missing image encoder, an encoder of another width are refused by name."""
        from ..demo import resolve_special_id
        from ..topology import unet_plan

        backend = self.backend
        if backend.is_video_unet and backend.motion_config is None:
            raise UnsupportedModelError("IP-Adapter: UNet3D (ModelScope / Zeroscope) models are not supported")
        pretrained_model_name_or_path_or_dict, subfolder, weight_name = (
            _one_adapter(v, name) for v, name in ((pretrained_model_name_or_path_or_dict, "the source"),
                                                  (subfolder, "subfolder"), (weight_name, "weight_name")))
        previous = self.ip_adapter
        pretrained_model_name_or_path_or_dict = resolve_special_id(pretrained_model_name_or_path_or_dict)
        if isinstance(pretrained_model_name_or_path_or_dict, Mapping):
            origin = "the given IP-Adapter state dict"
            groups = split_state(_flatten_state_dict(pretrained_model_name_or_path_or_dict), origin)
        else:
            files = resolve_ip_adapter(pretrained_model_name_or_path_or_dict, subfolder, weight_name,
                                       image_encoder_folder, local_files_only=local_files_only)
            origin = files.origin
            groups = read_ip_adapter_file(files.weights)
        adapter = parse_ip_adapter(groups, origin, unet_plan(backend.unet_config, backend.motion_config),
                                   backend.unet_config.cross_attention_dim)
        if image_encoder_folder is None:
            encoder, encoder_folder = None, None
        elif isinstance(pretrained_model_name_or_path_or_dict, Mapping):
            if previous is None or previous.encoder is None:
                raise IPAdapterError("the image encoder cannot be loaded for an IP-Adapter given as a state dict "
                                     "(as diffusers): pass image_encoder_folder=None and use ip_adapter_image_embeds, "
                                     "or load the adapter from its file")
            encoder, encoder_folder = previous.encoder, previous.encoder_folder  # the one already loaded, as diffusers
            check_encoder_fits(encoder.config, adapter.projection, encoder_folder, origin)
        else:
            encoder_folder = files.image_encoder
            encoder = self._image_encoder_for(adapter, encoder_folder)
        if previous is not None:
            previous.host.detach()
        host = backend.ip_adapter_host()
        host.attach(adapter)
        backend.ip_adapter = LoadedIPAdapter(host, origin, adapter.num_tokens, adapter.projection.image_embed_dim,
                                             adapter.projection.hidden_states, encoder, encoder_folder)

    def _image_encoder_for(self, adapter: IPAdapterWeights, folder: Path | None) -> Any:
        """The image encoder in ``folder``, checked against the adapter (reused when already loaded)."""
        if folder is None:
            return None
        previous = self.ip_adapter
        if previous is not None and previous.encoder_folder == folder and previous.encoder is not None:
            encoder = previous.encoder
        else:
            encoder = self.backend.ip_adapter_host().load_image_encoder(folder)
        check_encoder_fits(encoder.config, adapter.projection, folder, adapter.origin)
        return encoder

    def set_ip_adapter_scale(self, scale: float | Sequence[float]) -> None:
        """How much the image prompt counts: text attention + ``scale`` x image attention in every attn2
        (0: exactly no adapter; 1: the default; diffusers' usual 0.5-0.7 for image + text prompts). A list of
        one number is diffusers' per-adapter form; per-block dicts (InstantStyle) are refused."""
        loaded = self._loaded_ip_adapter("set_ip_adapter_scale")
        if isinstance(scale, (list, tuple)):
            if len(scale) != 1:
                raise ValueError(f"set_ip_adapter_scale: {len(scale)} scales for 1 loaded IP-Adapter")
            scale = scale[0]
        if isinstance(scale, Mapping):
            raise ValueError("set_ip_adapter_scale: per-block scales (a dict, InstantStyle) are not supported; "
                             "pass one number")
        value = finite_float(scale, "ip_adapter_scale")
        loaded.host.set_scale(value)
        loaded.scale = value

    def unload_ip_adapter(self) -> None:
        """Remove the IP-Adapter and its image encoder; the UNet is as loaded again (none loaded: nothing to do,
        as diffusers)."""
        if self.ip_adapter is not None:
            self.ip_adapter.host.detach()
            self.backend.ip_adapter = None

    def check_image_tokens(self, positive: Conditioning) -> None:
        """With an IP-Adapter loaded, every denoising run carries the image prompt: the calls that take none
        (latent walks, interpolation, ``embedding_to_latent``) are refused rather than run without it."""
        if self.ip_adapter is not None and positive.ip_hidden_states is None:
            raise IPAdapterError(f"an IP-Adapter is loaded ({self.ip_adapter.origin}) and this call takes no image "
                                 "prompt (ip_adapter_image=); unload_ip_adapter() first")

    def _loaded_ip_adapter(self, what: str) -> LoadedIPAdapter:
        if self.ip_adapter is None:
            raise IPAdapterError(f"{what}: no IP-Adapter is loaded (load_ip_adapter first)")
        return self.ip_adapter

    # ------------------------------------------------------------------------------ per call
    def check_image_prompt(self, ip_adapter_image: Any = None, ip_adapter_image_embeds: Any = None,
                           batch: int = 1, guided: bool = True) -> ImagePrompt | None:
        """Step 1 of a recipe: the call's image prompt checked and its images read (no network runs).
        ``ip_adapter_image``: an image (path, PIL, (H, W, 3) array) or diffusers' list with one entry per
        loaded adapter (an entry may be a list: several images for that adapter, their tokens joined).
        ``ip_adapter_image_embeds``: diffusers' list of one (k, n, D) array per adapter, the negative half
        first when guided, its batch 1 or ``batch`` (prompts x num_images_per_prompt) per half."""
        if ip_adapter_image is None and ip_adapter_image_embeds is None:
            if self.ip_adapter is not None:
                raise IPAdapterError(f"an IP-Adapter is loaded ({self.ip_adapter.origin}): pass ip_adapter_image= or "
                                     "ip_adapter_image_embeds=, or unload_ip_adapter()")
            return None
        given = "ip_adapter_image" if ip_adapter_image is not None else "ip_adapter_image_embeds"
        if ip_adapter_image is not None and ip_adapter_image_embeds is not None:
            raise ValueError("pass ip_adapter_image or ip_adapter_image_embeds, not both")
        loaded = self.ip_adapter
        if loaded is None:
            raise IPAdapterError(f"{given} was given but no IP-Adapter is loaded (load_ip_adapter first)")
        if ip_adapter_image is not None:
            images = self._images_per_adapter(ip_adapter_image)
            if loaded.encoder is None:
                raise IPAdapterError(f"the IP-Adapter {loaded.origin} was loaded without its image encoder "
                                     "(image_encoder_folder=None): pass ip_adapter_image_embeds instead")
            from ..clip_image_processing import clip_pixels

            return ImagePrompt(pixels=clip_pixels(images, loaded.encoder.config.image_size))
        return self._checked_embeds(ip_adapter_image_embeds, loaded, batch, guided)

    @staticmethod
    def _images_per_adapter(image: Any) -> list[Any]:
        if not isinstance(image, (list, tuple)):
            return [image]
        if len(image) != 1:
            raise ValueError(f"ip_adapter_image has {len(image)} entries for 1 loaded IP-Adapter (diffusers' rule: "
                             "one entry per adapter; pass [[image_1, image_2]] for several images to one adapter)")
        entry = image[0]
        images = list(entry) if isinstance(entry, (list, tuple)) else [entry]
        if not images:
            raise ValueError("ip_adapter_image: no images given")
        return images

    @staticmethod
    def _checked_embeds(embeds: Any, loaded: LoadedIPAdapter, batch: int, guided: bool) -> ImagePrompt:
        from ..backends.base import as_numpy

        if not isinstance(embeds, (list, tuple)) or len(embeds) != 1:
            count = len(embeds) if isinstance(embeds, (list, tuple)) else "not a list:"
            raise ValueError(f"ip_adapter_image_embeds must be a list with one array per loaded IP-Adapter (1), got "
                             f"{count} {type(embeds).__name__}")
        arr = as_numpy(embeds[0])
        layout = "(batch, images, tokens, D)" if loaded.hidden_states else "(batch, images, D)"  # Plus: hidden states
        if arr.ndim != 3 + loaded.hidden_states or arr.shape[-1] != loaded.image_embed_dim or 0 in arr.shape:
            raise ValueError(f"ip_adapter_image_embeds[0] must be {layout} with D = {loaded.image_embed_dim} "
                             f"(diffusers' layout), got {arr.shape}")
        if not np.isfinite(arr).all():
            raise ValueError("ip_adapter_image_embeds must not contain NaN or infinite values")
        if guided and arr.shape[0] % 2:
            raise ValueError(f"ip_adapter_image_embeds[0] has {arr.shape[0]} rows; with classifier-free guidance it "
                             "holds the negative half first, then the positive (an even count)")
        half = arr.shape[0] // 2 if guided else arr.shape[0]
        if half not in (1, batch):
            raise ValueError(f"ip_adapter_image_embeds[0] has {half} rows per guidance branch for a batch of {batch} "
                             "(prompts x num_images_per_prompt); pass one, or one per sample")
        if not guided:
            return ImagePrompt(embeds=arr, negative_embeds=np.zeros_like(arr))
        return ImagePrompt(embeds=arr[half:], negative_embeds=arr[:half])

    def add_image_prompt(self, positive: Conditioning, negative: Conditioning | None,
                         prompt: ImagePrompt | None) -> tuple[Conditioning, Conditioning | None]:
        """Step 2: the image prompt's tokens into both branches' conditioning. The unconditional branch gets
        the projection of zero image embeddings, as diffusers' classifier-free guidance does."""
        if prompt is None:
            return positive, negative
        loaded = self._loaded_ip_adapter("ip_adapter_image")
        backend, host = self.backend, loaded.host
        if prompt.pixels is not None:
            pos = host.encode_images(loaded.encoder, prompt.pixels)[None]  # (1, n, D); Plus (1, n, L, D)
            # The unconditional image, as diffusers: zero embeddings; for Plus the hidden states of a zero image.
            neg = host.encode_images(loaded.encoder, np.zeros_like(prompt.pixels))[None] if loaded.hidden_states \
                else pos * 0.0
        else:
            pos, neg = backend.from_numpy(prompt.embeds), backend.from_numpy(prompt.negative_embeds)
        tokens = self._per_sample(host.project(pos), positive.batch_size, "ip_adapter_image_embeds")
        positive = replace(positive, ip_hidden_states=tokens)
        if negative is not None:
            negative = replace(negative, ip_hidden_states=self._per_sample(host.project(neg), negative.batch_size,
                                                                           "ip_adapter_image_embeds"))
        return positive, negative

    def _per_sample(self, tokens: Any, batch: int, name: str) -> Any:
        """One row of image tokens for every sample, or one per sample."""
        rows = int(tokens.shape[0])
        if rows == batch:
            return tokens
        if rows != 1:
            raise ValueError(f"{name}: {rows} rows for a batch of {batch} (prompts x num_images_per_prompt); "
                             "pass one, or one per sample")
        return self.backend.concat([tokens] * batch)
