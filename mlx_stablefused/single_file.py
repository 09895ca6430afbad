"""Single-file checkpoints (``v1-5-pruned-emaonly.safetensors``, ``512-inpainting-ema.ckpt``, a VAE file) as a
``ModelSource``: the original CompVis/LDM key naming read in place, no conversion step.

``ldm_checkpoint`` says what a file is (key maps, configs from its tensor shapes); here the configs are
written once to a small folder in the cache (keyed by the file's identity and the configs), or taken from
``config=`` (a diffusers folder or hub id), and each component becomes a ``ComponentFiles`` that reads its
tensors from the one file through its key map: loading takes the same strict path as a diffusers folder,
and the MLX conversion cache works as for folders. Hub files (``owner/repo/file.safetensors``) download
with ``hf_hub_download``; ``vae=`` replaces any model's VAE with a file or a diffusers VAE folder.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

from . import __version__
from .checkpoint_io import atomic_directory, write_json
from .config import read_json
from .errors import ModelSourceError
from .ldm_checkpoint import (CLIP_VOCABULARY, TEMPLATES, TOKENIZER_OF, YAML_SUFFIXES, OriginalConfig, SingleFilePlan,
                             checkpoint_shapes, mapped_shapes, plan_checkpoint, vae_config, vae_names)
from .model_description import STABLE_DIFFUSION, ModelDescription, description_for
from .sources import (ComponentFiles, ModelSource, cache_root, classify_folder, download_configs, download_file,
                      is_hub_file, resolve_model, select_weight_file)


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:24]


def file_identity(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def write_config_folder(target: Path, plan: SingleFilePlan) -> None:
    """A diffusers folder without weights: model index, component configs, scheduler, tokenizer(s)."""
    with atomic_directory(target, overwrite=True) as tmp:
        write_json(tmp / "model_index.json", plan.configs["model_index"])
        write_json(tmp / "scheduler" / "scheduler_config.json", plan.configs["scheduler"])
        for name in plan.key_maps:  # unet, vae, the text encoder(s)
            write_json(tmp / name / "config.json", plan.configs[name])
        for folder in (TOKENIZER_OF[t.component] for t in plan.text_encoders):
            tokenizer = tmp / folder
            tokenizer.mkdir()
            for name in ("vocab.json", "merges.txt"):
                with gzip.open(CLIP_VOCABULARY / f"{name}.gz", "rb") as src:
                    (tokenizer / name).write_bytes(src.read())
            write_json(tokenizer / "tokenizer_config.json", plan.configs[folder])


def _generated_folder(kind: str, identity: Any, write: Any) -> Path:
    """A folder of generated configs in the cache, made once per identity (so its files keep their mtimes
    and the conversion cache's key stays put); a temporary folder when the cache cannot be written."""
    target = cache_root() / "single-file" / f"{kind}-{_fingerprint(identity)}"
    if not target.is_dir():
        try:
            write(target)
        except OSError as e:
            import tempfile

            target = Path(tempfile.mkdtemp(prefix="mlx-stablefused-single-file-")) / "configs"
            warnings.warn(f"could not write the single-file configs to the cache ({e}); using {target}", stacklevel=4)
            write(target)
    return target


def local_checkpoint(spec: str | Path, *, revision: str | None = None, local_files_only: bool = False) -> Path:
    """A checkpoint file on disk: the path itself, or a hub ``owner/repo/file`` downloaded (or cached)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if is_hub_file(str(spec)):
        return download_file(str(spec), revision=revision, local_files_only=local_files_only)
    raise ModelSourceError(f"checkpoint {str(spec)!r} does not exist (and is not a hub owner/repo/file path)")


def _sidecar(spec: str | Path, path: Path, revision: str | None, local_files_only: bool) -> OriginalConfig:
    if Path(spec).expanduser().is_file() or local_files_only:
        return OriginalConfig.beside(path)
    stem = str(spec).rsplit(".", 1)[0]
    for suffix in YAML_SUFFIXES:  # a hub file's .yaml lives beside it in the repo, if anywhere
        try:
            return OriginalConfig.read(download_file(stem + suffix, revision=revision, quiet=True))
        except ModelSourceError:
            continue
    return OriginalConfig()


def resolve_model_or_file(model_id: str | Path, *, config: str | Path | None = None, use_ema: bool = False,
                          prediction_type: str | None = None, **options: Any) -> ModelSource:
    """``sources.resolve_model``, and single-file checkpoints (a path, or ``owner/repo/file.safetensors``)."""
    if isinstance(model_id, (str, Path)) and (Path(model_id).expanduser().is_file() or is_hub_file(str(model_id))):
        if options.pop("variant", None) is not None:
            raise ValueError(f"variant= picks among a folder's weight files; {str(model_id)!r} is one file")
        return resolve_single_file(model_id, config=config, use_ema=use_ema, prediction_type=prediction_type,
                                   **options)
    given = [name for name, v in (("config", config), ("use_ema", use_ema)) if v not in (None, False)]
    if given:
        raise ValueError(f"{'= and '.join(given)}= apply to single-file checkpoints; {str(model_id)!r} is not one")
    return resolve_model(model_id, **options)


def resolve_single_file(spec: str | Path, *, config: str | Path | None = None, use_ema: bool = False,
                        prediction_type: str | None = None, revision: str | None = None,
                        local_files_only: bool = False,
                        description: ModelDescription | None = None) -> ModelSource:
    """A single-file checkpoint as a ModelSource: configs in a small generated folder (or ``config``'s),
    each component's weights read from the file through its key map. The file's keys say what it is
    (SD 1.x / 2.x, SDXL base, SDXL refiner), so ``description`` is not needed (kept for callers)."""
    if prediction_type not in (None, "epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    if not isinstance(use_ema, bool):
        raise ValueError(f"use_ema must be True or False, got {use_ema!r}")
    path = local_checkpoint(spec, revision=revision, local_files_only=local_files_only)
    shapes = checkpoint_shapes(path)
    original = _sidecar(spec, path, revision, local_files_only)
    plan = plan_checkpoint(shapes, str(spec), use_ema=use_ema, prediction_type=prediction_type, original=original,
                           infer=config is None)
    family = family_description(plan)
    if config is not None:
        root = _config_root(config, revision, local_files_only, family)
    else:
        root = _generated_folder("model", {"file": file_identity(path), "configs": plan.configs,
                                           "version": __version__}, lambda t: write_config_folder(t, plan))
    index = root / "model_index.json"
    described = description_for(read_json(index)) if index.is_file() else STABLE_DIFFUSION
    if set(described.names) != set(family.names):
        raise ModelSourceError(f"config={str(config)!r} describes {described.name} ({', '.join(described.names)}) but "
                               f"{spec} is {family.name} ({', '.join(family.names)}), as its keys say")
    overrides = {}
    for c in family.components:
        overrides[c.name] = ComponentFiles(root / c.folder / "config.json", (path,), plan.key_maps[c.name],
                                           _fingerprint({"key_map": plan.key_maps[c.name], "use_ema": use_ema}))
    return ModelSource(root, "single_file", str(spec), overrides)


def family_description(plan: SingleFilePlan) -> ModelDescription:
    """The components a checkpoint family has, as its template's model index names them."""
    return description_for(read_json(TEMPLATES / f"{plan.family}.json")["model_index"])


def _config_root(config: str | Path, revision: str | None, local_files_only: bool,
                 description: ModelDescription) -> Path:
    path = Path(config).expanduser()
    if path.is_dir():
        if classify_folder(path) != "diffusers":
            raise ModelSourceError(f"config={str(config)!r} is not a diffusers model folder (no model_index.json "
                                   "or unet/config.json)")
        return path.resolve()
    if path.exists() or str(config).startswith((".", "/", "~")) or str(config).count("/") != 1:
        raise ModelSourceError(f"config={str(config)!r} is neither a diffusers folder nor a hub repo id")
    return download_configs(str(config), revision=revision, local_files_only=local_files_only, description=description)


# ------------------------------------------------------------------------------------------ vae=
def resolve_vae(spec: str | Path, source: ModelSource, *, revision: str | None = None,
                local_files_only: bool = False, description: ModelDescription = STABLE_DIFFUSION) -> ModelSource:
    """``source`` with its VAE taken from ``spec``: a diffusers VAE folder or hub repo, or a VAE file (LDM
    keys with or without ``first_stage_model.``, or diffusers keys; a full checkpoint's VAE part works too).
    A file's config is inferred from its tensors; the latent scaling stays the model's own."""
    vae = description.first_with_role("vae")
    if vae is None:
        raise ModelSourceError(f"{description.name} has no VAE to replace")
    path = Path(spec).expanduser()
    if path.is_dir() or (not path.exists() and not is_hub_file(str(spec)) and str(spec).count("/") == 1
                         and not str(spec).startswith((".", "/", "~"))):
        files = _vae_folder(path if path.is_dir() else _download_vae_folder(str(spec), revision, local_files_only),
                            vae, str(spec))
    else:
        file = local_checkpoint(spec, revision=revision, local_files_only=local_files_only)
        shapes = checkpoint_shapes(file)
        key_map, naming = vae_names(shapes)
        inferred = vae_config(mapped_shapes(shapes, key_map))
        base = read_json(source.config_path(vae))
        merged = {**base, **inferred}
        root = _generated_folder("vae", {"file": file_identity(file), "config": merged, "version": __version__},
                                 lambda t: _write_vae_config(t, merged))
        files = ComponentFiles(root / "config.json", (file,), key_map, _fingerprint({"key_map": key_map, "naming": naming}))
    return ModelSource(source.root, source.kind, source.origin, {**source.overrides, vae.name: files})


def _write_vae_config(target: Path, config: dict) -> None:
    with atomic_directory(target, overwrite=True) as tmp:
        write_json(tmp / "config.json", config)


def _vae_folder(folder: Path, vae: Any, origin: str) -> ComponentFiles:
    if (folder / vae.folder / "config.json").is_file() and not (folder / "config.json").is_file():
        folder = folder / vae.folder  # a whole diffusers model: its VAE
    config = folder / "config.json"
    if not config.is_file() or read_json(config).get("_class_name") not in (None, "AutoencoderKL"):
        raise ModelSourceError(f"vae={origin!r}: {folder} is not a diffusers AutoencoderKL folder (config.json)")
    names = [f"{vae.folder}/{p.name}" for p in folder.iterdir()]
    rel = select_weight_file(names, vae, None)
    if rel is None or rel.endswith(".json"):
        raise ModelSourceError(f"vae={origin!r}: no single weight file in {folder} "
                               f"(looked for {', '.join(vae.weight_candidates(None))})")
    weights = folder / rel.split("/", 1)[1]
    return ComponentFiles(config, (weights,), None, _fingerprint({"vae_folder": str(weights)}))


def _download_vae_folder(repo_id: str, revision: str | None, local_files_only: bool) -> Path:
    return download_configs(repo_id, revision=revision, local_files_only=local_files_only,
                            patterns=["config.json", "diffusion_pytorch_model.safetensors"])
