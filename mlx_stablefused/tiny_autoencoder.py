"""TAESD (diffusers' ``AutoencoderTiny``) beside a loaded model: find it, load it onto the model's backend, and
decode / encode with it, written once for every backend.

TAESD (madebyollin/taesd; TAESDXL for SDXL) is a distilled autoencoder of about 2.4M parameters per half that
reads the diffusion model's latents as they are (its ``scaling_factor`` is 1.0): a preview costs a few 3x3
convolutions instead of the full VAE decoder. Its images are approximations: use it for live previews and
denoising videos, not for final images. This module imports no framework.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from .backends.base import Array, Backend
from .config import AutoencoderTinyConfig, read_json
from .errors import ModelSourceError, UnsupportedModelError
from .model_description import TINY_AUTOENCODER
from .utils.images import denormalize, normalize

DEFAULT_TINY_AUTOENCODER = "madebyollin/taesd"  # SD 1.x / 2.x latents; SDXL: madebyollin/taesdxl
COMPONENT = TINY_AUTOENCODER.components[0].name  # its key in backend.components / backend.configs
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def resolve_tiny_autoencoder(spec: str | Path = DEFAULT_TINY_AUTOENCODER, *, subfolder: str | None = None,
                             revision: str | None = None, local_files_only: bool = False) -> Path:
    """The folder of an AutoencoderTiny (``config.json`` + weights): a local folder, or a hub repo id
    (downloaded once: only the config and the safetensors weights). Offline and not cached: a
    ``ModelSourceError`` that says so and how to pass a folder instead."""
    path = Path(spec).expanduser()
    if path.exists():
        folder = path / subfolder if subfolder else path
        if not folder.is_dir():
            raise ModelSourceError(f"tiny autoencoder {spec!r}: {folder} is not a folder (pass the AutoencoderTiny "
                                   "folder holding config.json and diffusion_pytorch_model.safetensors)")
        return _checked(folder)
    text = str(spec)
    if not _REPO_ID.match(text) or text.startswith((".", "/", "~")):
        raise ModelSourceError(f"tiny autoencoder {text!r}: no such folder, and not a hub repo id (owner/name)")
    from huggingface_hub import snapshot_download

    from .hub_access import offline_reason

    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    patterns = [f"{prefix}config.json", f"{prefix}diffusion_pytorch_model*.safetensors"]
    reason = "offline mode requested" if local_files_only else offline_reason()
    try:
        root = snapshot_download(text, revision=revision, allow_patterns=patterns,
                                 local_files_only=reason is not None)
    except Exception as e:  # network and hub errors come in many types
        why = reason or f"{type(e).__name__}: {e}"
        raise ModelSourceError(
            f"could not get the tiny autoencoder {text!r} from the Hugging Face Hub ({why}) and it is not in the "
            "local cache; download it elsewhere and pass its folder: pipe.load_tiny_autoencoder('/path/to/taesd')"
        ) from e
    return _checked(Path(root) / prefix if prefix else Path(root))


def _checked(folder: Path) -> Path:
    config = folder / "config.json"
    if not config.is_file():
        raise ModelSourceError(f"{folder} has no config.json; is it a diffusers AutoencoderTiny folder?")
    named = read_json(config).get("_class_name")
    if named not in (None, "AutoencoderTiny"):
        raise UnsupportedModelError(f"{config}: _class_name={named!r}, expected 'AutoencoderTiny' (TAESD)")
    return folder


def load_tiny_autoencoder(backend: Backend, spec: str | Path = DEFAULT_TINY_AUTOENCODER, **source: Any) -> None:
    """Load an AutoencoderTiny onto ``backend`` (as ``backend.components['tiny_vae']``, so every pipeline sharing
    the model has it), after checking its latents fit the model's VAE. ``source``: ``resolve_tiny_autoencoder``'s."""
    folder = resolve_tiny_autoencoder(spec, **source)
    config = AutoencoderTinyConfig.from_dict(read_json(folder / "config.json"))
    vae = backend.vae_config
    if config.latent_channels != vae.latent_channels or config.downscale_factor != vae.downscale_factor:
        raise UnsupportedModelError(
            f"tiny autoencoder {spec!r} has {config.latent_channels}-channel latents at 1/{config.downscale_factor} "
            f"scale, but this model's VAE has {vae.latent_channels} at 1/{vae.downscale_factor}")
    module = backend.load_network(folder, COMPONENT, TINY_AUTOENCODER)
    backend.components[COMPONENT] = module
    backend.configs[COMPONENT] = config


def has_tiny_autoencoder(backend: Backend) -> bool:
    return COMPONENT in getattr(backend, "components", {})


def tiny_decode(backend: Backend, latents: Array) -> np.ndarray:
    """Scaled native latents (B, C, h, w in the backend's layout) -> (B, H, W, 3) float32 numpy in [0, 1], by
    TAESD, as diffusers decodes with an AutoencoderTiny: ``latents / scaling_factor + shift_factor``."""
    module, config = backend.components[COMPONENT], backend.configs[COMPONENT]
    if config.scaling_factor != 1.0:
        latents = latents * (1.0 / config.scaling_factor)
    if config.shift_factor:
        latents = latents + config.shift_factor
    return denormalize(backend.images_to_numpy(module.decode(latents))).astype(np.float32)


def tiny_encode(backend: Backend, pixels: np.ndarray) -> Array:
    """(B, H, W, 3) float pixels in [0, 1] -> scaled native latents, by TAESD's encoder."""
    module, config = backend.components[COMPONENT], backend.configs[COMPONENT]
    latents = module.encode(backend.images_from_numpy(normalize(pixels)))
    if config.shift_factor:
        latents = latents - config.shift_factor
    return latents * config.scaling_factor if config.scaling_factor != 1.0 else latents
