"""Build the MLX modules from a model folder and fill them with its weights.

A diffusers folder is converted to MLX layout (converter: ``convert_model``) and the
result cached, so the second load reads ready-made MLX safetensors. A converted folder
loads directly. Either way loading is strict (see ``weights``).
"""

from __future__ import annotations

import hashlib
import warnings
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from ... import __version__
from ...checkpoint_io import atomic_directory, load_weights, save_safetensors, write_json
from ...config import CLIPTextConfig, MotionConfig, UNet3DConfig, UNetConfig, VAEConfig, read_json, unet_class_name
from ...errors import ModelSourceError
from ...motion_adapters import MotionAdapterSource, motion_state
from ...sources import MANIFEST_NAME, MODEL_COMPONENTS, ModelSource, cache_root, local_weight_file, shard_files
from ...weights import RULES
from .weights import apply_weights, check_keys, convert_state
from .clip import CLIPTextModel
from .unet import UNet2DConditionModel
from .unet3d import UNet3DConditionModel
from .vae import AutoencoderKL

CONVERTED_WEIGHTS = "weights.safetensors"
FORMAT_VERSION = 1
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


@dataclass(frozen=True)
class ComponentSpec:
    parse_config: Callable[[dict], object]
    build: Callable[[object], nn.Module]


SPECS = {
    "text_encoder": ComponentSpec(CLIPTextConfig.from_dict, CLIPTextModel),
    "unet": ComponentSpec(UNetConfig.from_dict, UNet2DConditionModel),
    "vae": ComponentSpec(VAEConfig.from_dict, AutoencoderKL),
}


def parse_dtype(dtype: str | mx.Dtype) -> mx.Dtype:
    if isinstance(dtype, mx.Dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def dtype_name(dtype: mx.Dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def build_component(root: Path, component: str, motion: MotionConfig | None = None) -> nn.Module:
    config_file = root / component / "config.json"
    if not config_file.is_file():
        raise ModelSourceError(f"{config_file} is missing")
    raw = read_json(config_file)
    if component == "unet" and unet_class_name(raw) == "UNet3DConditionModel":
        if motion is not None:
            raise ModelSourceError("this model's UNet is already a video UNet (UNet3D); it takes no motion adapter")
        return UNet3DConditionModel(UNet3DConfig.from_dict(raw))
    spec = SPECS[component]
    config = spec.parse_config(raw)
    return UNet2DConditionModel(config, motion) if motion is not None else spec.build(config)


def read_diffusers_component(root: Path, component: str, model: nn.Module, variant: str | None,
                             dtype: mx.Dtype | None) -> dict[str, mx.array]:
    """MLX-layout weights for ``model`` from a diffusers component folder (lazy arrays)."""
    path = local_weight_file(root, component, variant)
    files = shard_files(path) if path.name.endswith(".json") else [path]
    state: dict[str, mx.array] = {}
    for f in files:
        state.update(load_weights(f))
    return convert_state(model, state, RULES[component], dtype)


def _copy_support_files(src: Path, dst: Path) -> None:
    for rel in ("model_index.json", "scheduler/scheduler_config.json"):
        if (src / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, dst / rel)
    if (src / "tokenizer").is_dir():
        shutil.copytree(src / "tokenizer", dst / "tokenizer", dirs_exist_ok=True)


def convert_model(source: ModelSource, destination: str | Path, *, dtype: str = "float16",
                  variant: str | None = None, overwrite: bool = False) -> Path:
    """Convert a diffusers model to an MLX folder: MLX-layout safetensors, configs, tokenizer, manifest.

    The folder is assembled under a temporary name and renamed into place when complete.
    """
    if source.kind != "diffusers":
        raise ValueError(f"{source.origin} is already a converted MLX model")
    target_dtype = parse_dtype(dtype)
    destination = Path(destination)
    root = source.root
    with atomic_directory(destination, overwrite=overwrite) as tmp:
        _copy_support_files(root, tmp)
        files = {}
        for component in MODEL_COMPONENTS:
            model = build_component(root, component)
            weights = read_diffusers_component(root, component, model, variant, target_dtype)
            check_keys(model, weights, str(root / component))
            (tmp / component).mkdir(exist_ok=True)
            shutil.copy2(root / component / "config.json", tmp / component / "config.json")
            save_safetensors(tmp / component / CONVERTED_WEIGHTS, weights,
                             metadata={"format": "mlx", "component": component})
            files[component] = local_weight_file(root, component, variant).name
        write_json(tmp / MANIFEST_NAME, {
            "format": "mlx-stablefused",
            "format_version": FORMAT_VERSION,
            "converter_version": __version__,
            "source": source.origin,
            "source_files": files,
            "dtype": dtype_name(target_dtype),
            "layout": "NHWC convolutions (O, kh, kw, I); 1x1 convolutions as Linear (O, I)",
        })
    return destination


def read_manifest(root: Path) -> dict:
    manifest = read_json(root / MANIFEST_NAME)
    if manifest.get("format") != "mlx-stablefused":
        raise ModelSourceError(f"{root / MANIFEST_NAME} is not an mlx-stablefused manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ModelSourceError(f"{root} was converted with format version {manifest.get('format_version')}; "
                               f"this version reads {FORMAT_VERSION}. Convert the model again.")
    return manifest


def _cache_key(source: ModelSource, dtype: mx.Dtype, variant: str | None) -> str:
    """Identity of the exact weight files (path, size, mtime) plus dtype and converter version."""
    h = hashlib.sha256()
    h.update(f"{__version__}|{FORMAT_VERSION}|{dtype_name(dtype)}|{variant}".encode())
    for component in MODEL_COMPONENTS:
        path = local_weight_file(source.root, component, variant)
        files = shard_files(path) if path.name.endswith(".json") else [path]
        for f in files + [source.root / component / "config.json"]:
            st = f.stat()
            h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def converted_folder(source: ModelSource, dtype: mx.Dtype, variant: str | None, use_cache: bool) -> Path | None:
    """The converted copy of a diffusers model in the cache, creating it on first use."""
    if source.kind == "mlx":
        return source.root
    if not use_cache:
        return None
    target = cache_root() / "converted" / _cache_key(source, dtype, variant)
    if (target / MANIFEST_NAME).is_file():
        return target
    try:
        convert_model(source, target, dtype=dtype_name(dtype), variant=variant, overwrite=True)
    except OSError as e:  # a read-only or full cache must not stop loading
        warnings.warn(f"could not cache the converted model in {target} ({e}); loading from the source", stacklevel=3)
        return None
    return target


def load_components(source: ModelSource, dtype: mx.Dtype, *, variant: str | None = None, use_cache: bool = True,
                    vae_dtype: mx.Dtype | None = None,
                    motion_adapter: MotionAdapterSource | None = None) -> dict[str, nn.Module]:
    """Text encoder, UNet and VAE of ``source`` with strict weights, in ``dtype`` (VAE in ``vae_dtype``).

    With ``motion_adapter`` the UNet is a motion UNet: the model's weights plus the adapter's.
    """
    folder = converted_folder(source, dtype, variant, use_cache)
    if folder is not None:
        read_manifest(folder)
    root = folder or source.root
    dtypes = {"text_encoder": dtype, "unet": dtype, "vae": vae_dtype or dtype}
    motion_weights, motion_config = {}, None
    if motion_adapter is not None:
        motion_weights, motion_config = motion_state(motion_adapter, load_weights)
    modules = {}
    for component in MODEL_COMPONENTS:
        model = build_component(root, component, motion_config if component == "unet" else None)
        if folder is not None:
            weights = load_weights(folder / component / CONVERTED_WEIGHTS)
        else:
            weights = read_diffusers_component(source.root, component, model, variant, None)
        if component == "unet" and motion_config is not None:
            weights = {**weights, **convert_state(model, motion_weights, [])}
        apply_weights(model, weights, f"{root / component}" + (f" + {motion_adapter.origin}"
                                                               if component == "unet" and motion_adapter else ""),
                      dtypes[component])
        modules[component] = model.eval()
    if folder is not None:  # where each component's weights can be re-read lazily (see MLXBackend.release_*)
        modules["weights_files"] = {c: folder / c / CONVERTED_WEIGHTS for c in MODEL_COMPONENTS}
    return modules

