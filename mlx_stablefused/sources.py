"""Resolve ``model_id`` to a folder on disk: a hub repo id, a diffusers folder, or a converted MLX folder.

Hub downloads fetch only what the pipelines need (configs, tokenizer, and one weight
file per component: safetensors preferred, the requested variant such as ``fp16`` when
the repo has it). Offline, a cached snapshot is used; with none, the error says how to
pass a local folder instead.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .errors import ModelSourceError

MANIFEST_NAME = "mlx_manifest.json"
DEMO_MODEL_ID = "demo:tiny-random"
MODEL_COMPONENTS = ("text_encoder", "unet", "vae")
SUPPORT_PATTERNS = ("model_index.json", "scheduler/*.json", "tokenizer/*", "*/config.json")
# (stem of safetensors files, stem of PyTorch pickles) per component, as diffusers names them.
WEIGHT_STEMS = {
    "text_encoder": ("model", "pytorch_model"),
    "unet": ("diffusion_pytorch_model", "diffusion_pytorch_model"),
    "vae": ("diffusion_pytorch_model", "diffusion_pytorch_model"),
}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass(frozen=True)
class ModelSource:
    root: Path
    kind: str  # "diffusers" or "mlx" (converted)
    origin: str  # what the user passed


def weight_candidates(component: str, variant: str | None) -> list[tuple[str, ...]]:
    """Weight file names for a component, best first; each entry is one file or a shard index."""
    st, pt = WEIGHT_STEMS[component]
    names: list[tuple[str, ...]] = []
    if variant:
        names += [(f"{st}.{variant}.safetensors",), (f"{st}.safetensors.index.{variant}.json",),
                  (f"{pt}.{variant}.bin",), (f"{pt}.bin.index.{variant}.json",)]
    names += [(f"{st}.safetensors",), (f"{st}.safetensors.index.json",), (f"{pt}.bin",), (f"{pt}.bin.index.json",)]
    return names


def select_weight_file(available: Iterable[str], component: str, variant: str | None) -> str | None:
    """Pick the best weight file (path relative to the model root) among ``available`` names."""
    available = set(available)
    for (name,) in weight_candidates(component, variant):
        rel = f"{component}/{name}"
        if rel in available:
            if variant and f".{variant}." not in name:
                warnings.warn(f"{component} has no {variant!r} variant; using {name}", stacklevel=3)
            return rel
    return None


def classify_folder(root: Path) -> str | None:
    if (root / MANIFEST_NAME).is_file():
        return "mlx"
    if (root / "model_index.json").is_file() or (root / "unet" / "config.json").is_file():
        return "diffusers"
    return None


def resolve_model(model_id: str | Path, *, variant: str | None = None, revision: str | None = None,
                  local_files_only: bool = False) -> ModelSource:
    """Find or download the model named ``model_id``."""
    if not isinstance(model_id, (str, Path)) or not str(model_id).strip():
        raise ModelSourceError(f"model_id must be a hub repo id or a path, got {model_id!r}")
    if str(model_id) == DEMO_MODEL_ID:
        from .demo import ensure_demo_model

        return ModelSource(ensure_demo_model(), "mlx", DEMO_MODEL_ID)
    path = Path(model_id).expanduser()
    if path.exists():
        if path.is_file():
            raise ModelSourceError(
                f"{path} is a single-file checkpoint; single-file loading is not supported yet. "
                "Pass a diffusers folder (model_index.json with unet/, vae/, text_encoder/, tokenizer/, scheduler/) "
                "or a hub repo id.")
        kind = classify_folder(path)
        if kind is None:
            raise ModelSourceError(f"{path} is neither a diffusers model folder (no model_index.json or "
                                   f"unet/config.json) nor a converted MLX folder (no {MANIFEST_NAME})")
        return ModelSource(path.resolve(), kind, str(model_id))
    text = str(model_id)
    if not _REPO_ID.match(text) or text.startswith((".", "/", "~")):
        raise ModelSourceError(f"model path {text!r} does not exist (and is not a hub repo id of the form owner/name)")
    root = _download(text, variant=variant, revision=revision, local_files_only=local_files_only)
    kind = classify_folder(root) or "diffusers"
    return ModelSource(root, kind, text)


def _download(repo_id: str, *, variant: str | None, revision: str | None, local_files_only: bool) -> Path:
    from huggingface_hub import HfApi, snapshot_download

    patterns = list(SUPPORT_PATTERNS) + [MANIFEST_NAME, "*/weights.safetensors"]
    reason = "offline mode requested"
    if not local_files_only:
        try:
            files = HfApi().list_repo_files(repo_id, revision=revision)
            chosen = [select_weight_file(files, c, variant) for c in MODEL_COMPONENTS]
            missing = [c for c, f in zip(MODEL_COMPONENTS, chosen) if f is None]
            if missing and MANIFEST_NAME not in files:
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
            f"could not get {repo_id!r} from the Hugging Face Hub ({reason}) and it is not in the local cache. "
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


def local_weight_file(root: Path, component: str, variant: str | None) -> Path:
    folder = root / component
    if not folder.is_dir():
        raise ModelSourceError(f"{root} has no {component}/ folder")
    names = [f"{component}/{p.name}" for p in folder.iterdir()]
    rel = select_weight_file(names, component, variant)
    if rel is None:
        wanted = ", ".join(n for (n,) in weight_candidates(component, variant))
        raise ModelSourceError(f"no weights in {folder} (looked for {wanted})")
    return root / rel


def shard_files(index_file: Path) -> list[Path]:
    """The shard files named by a ``*.index.json`` weight map."""
    import json

    with open(index_file, encoding="utf-8") as f:
        weight_map = json.load(f).get("weight_map", {})
    names = sorted(set(weight_map.values()))
    if not names:
        raise ModelSourceError(f"{index_file} lists no shards")
    return [index_file.parent / n for n in names]

