"""Resolve ``model_id`` to a folder on disk: a hub repo id, a diffusers folder, or a converted MLX folder.

Hub downloads fetch only what the pipelines need (configs, tokenizer, and one weight
file per component: safetensors preferred, the requested variant such as ``fp16`` when
the repo has it). Offline, a cached snapshot is used; with none, the error says how to
pass a local folder instead.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from . import converted_format as fmt
from .errors import ModelSourceError
from .model_description import STABLE_DIFFUSION, Component, ModelDescription

# Ids such as ``demo:tiny-random`` name models the entry layer (pipelines, CLI) builds itself
# (``mlx_stablefused.demo.resolve_special_id``); the resolver only recognises them, to say so.
SPECIAL_ID_PREFIX = "demo:"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass(frozen=True)
class ComponentFiles:
    """One component whose config and weights do not live in ``root/<component>/``: a part of a single-file
    checkpoint, or a separate VAE (``vae=``). ``key_map`` (weights.KeyMap) says which tensor of the files
    makes each parameter; ``None`` means the files use diffusers' names. ``fingerprint`` identifies the
    mapping (EMA or not, ...) in the conversion cache's key."""

    config: Path
    files: tuple[Path, ...]
    key_map: Mapping[str, tuple[str, tuple]] | None = field(default=None, repr=False)
    fingerprint: str = ""


@dataclass(frozen=True)
class ModelSource:
    root: Path
    kind: str  # "diffusers", "mlx" (converted) or "single_file" (root: the configs made for the file)
    origin: str  # what the user passed
    # components read from elsewhere than root (single-file checkpoints, vae=): name -> ComponentFiles
    overrides: Mapping[str, ComponentFiles] = field(default_factory=dict, compare=False, repr=False)

    def config_path(self, component: Component) -> Path:
        override = self.overrides.get(component.name)
        return override.config if override is not None else self.root / component.folder / "config.json"


def is_special_id(spec: object) -> bool:
    return isinstance(spec, str) and spec.startswith(SPECIAL_ID_PREFIX)


def select_weight_file(available: Iterable[str], component: Component, variant: str | None) -> str | None:
    """Pick the best weight file (path relative to the model root) among ``available`` names."""
    available = set(available)
    for name in component.weight_candidates(variant):
        rel = component.path(name)
        if rel in available:
            if variant and f".{variant}." not in name:
                warnings.warn(f"{component.name} has no {variant!r} variant; using {name}", stacklevel=3)
            return rel
    return None


def classify_folder(root: Path) -> str | None:
    if fmt.is_converted(root):
        return "mlx"
    if (root / "model_index.json").is_file() or (root / "unet" / "config.json").is_file():
        return "diffusers"
    return None


def resolve_model(model_id: str | Path, *, variant: str | None = None, revision: str | None = None,
                  local_files_only: bool = False, description: ModelDescription = STABLE_DIFFUSION) -> ModelSource:
    """Find or download the model named ``model_id`` (a hub id downloads what ``description`` needs)."""
    if not isinstance(model_id, (str, Path)) or not str(model_id).strip():
        raise ModelSourceError(f"model_id must be a hub repo id or a path, got {model_id!r}")
    if is_special_id(model_id):
        raise ModelSourceError(f"{model_id!r} is a special id: the pipelines and the CLI build it "
                               "(mlx_stablefused.demo.resolve_special_id gives its folder)")
    path = Path(model_id).expanduser()
    if path.is_file() or is_hub_file(str(model_id)):
        raise ModelSourceError(f"{str(model_id)!r} is a single-file checkpoint: the pipelines and the CLI load it "
                               "(mlx_stablefused.single_file.resolve_model_or_file gives its source)")
    if path.exists():
        kind = classify_folder(path)
        if kind is None:
            raise ModelSourceError(f"{path} is neither a diffusers model folder (no model_index.json or "
                                   f"unet/config.json) nor a converted MLX folder (no {fmt.MANIFEST_NAME})")
        return ModelSource(path.resolve(), kind, str(model_id))
    text = str(model_id)
    if not _REPO_ID.match(text) or text.startswith((".", "/", "~")):
        raise ModelSourceError(f"model path {text!r} does not exist (and is not a hub repo id of the form owner/name)")
    root = _download(text, variant=variant, revision=revision, local_files_only=local_files_only,
                     description=description)
    kind = classify_folder(root) or "diffusers"
    return ModelSource(root, kind, text)


def is_hub_file(text: str) -> bool:
    """``owner/repo/path/file.safetensors`` (or .ckpt ...): one file of a hub repo, not a local path."""
    from .checkpoint_io import PICKLE_SUFFIXES, SAFETENSORS_SUFFIX

    parts = text.split("/")
    return (len(parts) > 2 and not text.startswith((".", "/", "~")) and not Path(text).expanduser().exists()
            and _REPO_ID.match("/".join(parts[:2])) is not None
            and text.endswith((SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES)))


def download_file(spec: str, *, revision: str | None = None, local_files_only: bool = False,
                  quiet: bool = False) -> Path:
    """One file of a hub repo (``owner/repo/path``), from the local cache when offline or unreachable
    (``quiet``: no warning when the cached copy is used)."""
    from huggingface_hub import hf_hub_download

    from .hub_access import offline_reason

    parts = spec.split("/")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    reason = "offline mode requested" if local_files_only else offline_reason()
    if reason is None:
        try:
            return Path(hf_hub_download(repo, filename, revision=revision))
        except Exception as e:  # network and hub errors come in many types
            reason = f"{type(e).__name__}: {e}"
    try:
        path = Path(hf_hub_download(repo, filename, revision=revision, local_files_only=True))
    except Exception as e:
        raise ModelSourceError(
            f"could not get {spec!r} from the Hugging Face Hub ({reason}) and it is not in the local cache. "
            "Check your connection, or download the file elsewhere and pass its path.") from e
    if not local_files_only and not quiet:
        warnings.warn(f"using the cached copy of {spec!r} ({reason})", stacklevel=3)
    return path


def download_configs(repo_id: str, *, revision: str | None = None, local_files_only: bool = False,
                     description: ModelDescription = STABLE_DIFFUSION, patterns: list[str] | None = None) -> Path:
    """A hub model's configs, tokenizer and scheduler only (``config=`` of a single-file checkpoint), or
    the files matching ``patterns``; from the local cache when offline or unreachable."""
    from huggingface_hub import snapshot_download

    from .hub_access import offline_reason

    patterns = patterns or description.hub_support_patterns()
    reason = "offline mode requested" if local_files_only else offline_reason()
    if reason is None:
        try:
            return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
        except Exception as e:  # network and hub errors come in many types
            reason = f"{type(e).__name__}: {e}"
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=True))
    except Exception as e:
        raise ModelSourceError(f"could not get {patterns} of {repo_id!r} from the Hugging Face Hub ({reason}) "
                               "and they are not in the local cache; pass a local folder instead") from e


def _download(repo_id: str, *, variant: str | None, revision: str | None, local_files_only: bool,
              description: ModelDescription) -> Path:
    from huggingface_hub import HfApi, snapshot_download

    from .hub_access import offline_reason

    patterns = description.hub_support_patterns() + list(fmt.HUB_PATTERNS)
    reason = "offline mode requested" if local_files_only else offline_reason()
    if reason is None:
        try:
            files = HfApi().list_repo_files(repo_id, revision=revision)
            chosen = [select_weight_file(files, c, variant) for c in description.components]
            missing = [c.name for c, f in zip(description.components, chosen) if f is None]
            if missing and fmt.MANIFEST_NAME not in files:
                raise ModelSourceError(f"hub repo {repo_id!r} has no weights for {missing}; "
                                       "is it a Stable Diffusion model in diffusers format?")
            for rel in filter(None, chosen):
                patterns.append(rel)
                if rel.endswith(".json"):  # a shard index: fetch its shards too
                    patterns.append(rel.rsplit("/", 1)[0] + "/*" + (".bin" if ".bin." in rel else ".safetensors"))
            return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
        except ModelSourceError:
            raise
        except Exception as e:  # network errors come in many types (requests, httpx, hub)
            reason = f"{type(e).__name__}: {e}"
    try:
        root = Path(snapshot_download(repo_id, revision=revision, allow_patterns=["*"], local_files_only=True))
    except Exception as e:
        raise ModelSourceError(
            f"could not get {repo_id!r} from the Hugging Face Hub ({reason}) and it is not in the local cache; "
            "Check your connection, or download the model elsewhere and pass its folder: "
            "TextToImageDiffusion(model_id='/path/to/model_folder').") from e
    warnings.warn(f"using the cached copy of {repo_id!r} ({reason})", stacklevel=3)
    return root


def cache_root() -> Path:
    """Where converted models and the demo model live (MLX_STABLEFUSED_CACHE, else ~/.cache/mlx-stablefused)."""
    import os

    env = os.environ.get("MLX_STABLEFUSED_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mlx-stablefused"


def local_weight_file(root: Path, component: Component, variant: str | None) -> Path:
    """The best weight file of ``component`` in a diffusers folder (a shard index for sharded weights)."""
    folder = root / component.folder
    if not folder.is_dir():
        raise ModelSourceError(f"{root} has no {component.folder}/ folder")
    names = [component.path(p.name) for p in folder.iterdir()]
    rel = select_weight_file(names, component, variant)
    if rel is None:
        wanted = ", ".join(component.weight_candidates(variant))
        raise ModelSourceError(f"no weights in {folder} (looked for {wanted})")
    return root / rel


def weight_files(root: Path, component: Component, variant: str | None) -> list[Path]:
    """The files holding ``component``'s weights: its best weight file, or the shards it indexes."""
    path = local_weight_file(root, component, variant)
    return shard_files(path) if path.name.endswith(".json") else [path]


def shard_files(index_file: Path) -> list[Path]:
    """The shard files named by a ``*.index.json`` weight map."""
    import json

    with open(index_file, encoding="utf-8") as f:
        weight_map = json.load(f).get("weight_map", {})
    names = sorted(set(weight_map.values()))
    if not names:
        raise ModelSourceError(f"{index_file} lists no shards")
    return [index_file.parent / n for n in names]

