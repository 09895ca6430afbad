"""ControlNets beside a loaded model: find one (a diffusers folder, a hub id, an original-format single file),
check it fits the model, and load it onto the model's backend, written once for every backend. This module
imports no framework.

A diffusers ControlNet is a folder with ``config.json`` and ``diffusion_pytorch_model.safetensors`` (a hub id
downloads only those, through ``sources``). lllyasviel's original files (``control_v11p_sd15_canny.pth``,
``.safetensors``; ``control_model.*`` keys) are read through a key map (``controlnet_checkpoint``); their
config is inferred from the tensor shapes, or taken from ``config=`` (a diffusers ControlNet folder or hub id).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .backends.base import Backend
from .config import ControlNetConfig, read_json
from .errors import ModelSourceError, UnsupportedModelError
from .model_description import CONTROLNET
from .sources import ComponentFiles, is_hub_file
from .topology import ControlNetPlan, controlnet_plan, unet_plan

COMPONENT = CONTROLNET.components[0].name
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass(frozen=True)
class ControlNetSource:
    """Where a ControlNet's config and weights are: a diffusers folder (``files`` None) or a single file."""

    root: Path
    origin: str
    files: ComponentFiles | None = None


@dataclass(frozen=True)
class ControlNet:
    """One loaded ControlNet: the backend's module, its parsed config and plan, and what the user passed."""

    module: Any
    config: ControlNetConfig
    plan: ControlNetPlan
    origin: str

    @property
    def downscale_factor(self) -> int:
        return self.config.downscale_factor


def _checked_folder(folder: Path, origin: str) -> Path:
    config = folder / "config.json"
    if not config.is_file():
        raise ModelSourceError(f"ControlNet {origin!r}: {folder} has no config.json; a diffusers ControlNet folder "
                               "holds config.json and diffusion_pytorch_model.safetensors")
    named = read_json(config).get("_class_name")
    if named not in (None, "ControlNetModel"):
        raise UnsupportedModelError(f"ControlNet {origin!r}: {config} describes a {named!r}, not a ControlNetModel")
    return folder


def _hub_folder(repo_id: str, subfolder: str | None, revision: str | None, local_files_only: bool,
                variant: str | None) -> Path:
    from .sources import resolve_model

    if subfolder:
        from .sources import download_configs

        prefix = subfolder.strip("/")
        root = download_configs(repo_id, revision=revision, local_files_only=local_files_only,
                                patterns=[f"{prefix}/config.json", f"{prefix}/diffusion_pytorch_model*.safetensors"])
        return root / prefix
    return resolve_model(repo_id, variant=variant, revision=revision, local_files_only=local_files_only,
                         description=CONTROLNET).root


def resolve_controlnet(spec: str | Path, *, config: str | Path | None = None, subfolder: str | None = None,
                       variant: str | None = None, revision: str | None = None,
                       local_files_only: bool = False) -> ControlNetSource:
    """A ControlNet folder, hub repo id (``lllyasviel/control_v11p_sd15_canny``), or single file (a path or
    ``owner/repo/file.safetensors``) -> its source; nothing is loaded yet."""
    if not isinstance(spec, (str, Path)) or not str(spec).strip():
        raise ModelSourceError(f"controlnet must be a folder, a hub repo id or a file, got {spec!r}")
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_file() or is_hub_file(text):
        return _single_file(text, path, config, revision, local_files_only)
    if config is not None:
        raise ValueError(f"config= applies to single-file ControlNets; {text!r} is not a file")
    if path.exists():
        folder = path / subfolder if subfolder else path
        if not folder.is_dir():
            raise ModelSourceError(f"ControlNet {text!r}: {folder} is not a folder")
        return ControlNetSource(_checked_folder(folder, text).resolve(), text)
    if not _REPO_ID.match(text) or text.startswith((".", "/", "~")):
        raise ModelSourceError(f"ControlNet {text!r}: no such file or folder, and not a hub repo id (owner/name)")
    return ControlNetSource(_checked_folder(_hub_folder(text, subfolder, revision, local_files_only, variant), text),
                            text)


def _single_file(text: str, path: Path, config: str | Path | None, revision: str | None,
                 local_files_only: bool) -> ControlNetSource:
    from . import __version__
    from .checkpoint_io import atomic_directory, write_json
    from .controlnet_checkpoint import controlnet_plan as checkpoint_plan
    from .ldm_checkpoint import checkpoint_shapes
    from .single_file import _fingerprint, _generated_folder, file_identity, local_checkpoint

    path = local_checkpoint(text, revision=revision, local_files_only=local_files_only)
    key_map, inferred = checkpoint_plan(checkpoint_shapes(path), text)
    if config is not None:
        root = resolve_controlnet(config, revision=revision, local_files_only=local_files_only).root
    else:
        def write(target: Path) -> None:
            with atomic_directory(target, overwrite=True) as tmp:
                write_json(tmp / "config.json", inferred)

        root = _generated_folder("controlnet", {"file": file_identity(path), "config": inferred,
                                                "version": __version__}, write)
    files = ComponentFiles(root / "config.json", (path,), key_map, _fingerprint({"key_map": key_map}))
    return ControlNetSource(root, text, files)


def load_controlnet(backend: Backend, spec: str | Path | ControlNetSource, **source: Any) -> ControlNet:
    """A ControlNet on ``backend`` (the model's dtype and device), refused before its weights are read unless it
    fits the loaded model (cross-attention width, residual channels, latent channels, SDXL's added conditioning).
    ``source``: ``resolve_controlnet``'s keywords."""
    where = spec if isinstance(spec, ControlNetSource) else resolve_controlnet(spec, **source)
    config_file = where.files.config if where.files is not None else where.root / "config.json"
    config = ControlNetConfig.from_dict(read_json(config_file))
    plan = controlnet_plan(config)
    check_fits(backend, plan, config, where.origin)
    module = backend.load_network(where.root, COMPONENT, CONTROLNET, files=where.files)
    return ControlNet(module, config, plan, where.origin)


def check_fits(backend: Backend, plan: ControlNetPlan, config: ControlNetConfig, origin: str) -> None:
    """Refuse a ControlNet made for another base model (``topology.ControlNetPlan.check_fits``)."""
    unet_config = backend.unet_config
    if not hasattr(unet_config, "addition_embed_type"):
        raise UnsupportedModelError(f"ControlNet {origin!r}: this model's UNet is a {type(unet_config).__name__} "
                                    "(ModelScope); ControlNets fit SD 1.x / 2.x / SDXL UNets and AnimateDiff")
    vae = backend.vae_config
    plan.check_fits(unet_plan(unet_config), config.cross_attention_dim, unet_config.cross_attention_dim,
                    vae.latent_channels, vae.downscale_factor, config.downscale_factor, repr(origin))
