"""Build the torch modules from a model folder and fill them strictly with its weights.

Diffusers folders load directly (torch layout, same names); converted MLX folders are turned back
from MLX layout. Missing, unexpected or mis-shaped keys raise ``WeightLoadError`` naming them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ...checkpoint_io import load_torch_weights
from ...config import CLIPTextConfig, MotionConfig, UNet3DConfig, UNetConfig, VAEConfig, read_json, unet_class_name
from ...errors import ModelSourceError
from ...motion_adapters import MotionAdapterSource, motion_state
from ...sources import MODEL_COMPONENTS, ModelSource, local_weight_file, shard_files
from ...weights import RULES, check_names, check_shapes, map_keys
from .clip import CLIPTextModel
from .unet import UNet2DConditionModel
from .unet3d import UNet3DConditionModel
from .vae import AutoencoderKL

SPECS = {
    "text_encoder": (CLIPTextConfig.from_dict, CLIPTextModel),
    "unet": (UNetConfig.from_dict, UNet2DConditionModel),
    "vae": (VAEConfig.from_dict, AutoencoderKL),
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def build_component(root: Path, component: str, motion: MotionConfig | None = None) -> nn.Module:
    config_file = root / component / "config.json"
    if not config_file.is_file():
        raise ModelSourceError(f"{config_file} is missing")
    raw = read_json(config_file)
    if component == "unet" and unet_class_name(raw) == "UNet3DConditionModel":
        if motion is not None:
            raise ModelSourceError("this model's UNet is already a video UNet (UNet3D); it takes no motion adapter")
        return UNet3DConditionModel(UNet3DConfig.from_dict(raw))
    parse, build = SPECS[component]
    config = parse(raw)
    return UNet2DConditionModel(config, motion) if motion is not None else build(config)


def mlx_to_torch_layout(value: torch.Tensor, target_shape: tuple[int, ...]) -> torch.Tensor:
    """Undo the converter's layout: (O, kh, kw, I) kernels and 1x1 convolutions held as (O, I)."""
    if value.ndim == 4 and len(target_shape) == 4:
        return value.permute(0, 3, 1, 2).contiguous()
    if value.ndim == 2 and len(target_shape) == 4 and target_shape[2:] == (1, 1):
        return value.reshape(*value.shape, 1, 1)
    if value.ndim == 3 and len(target_shape) == 5:  # Conv1d over frames (O, k, I) -> Conv3d (O, I, k, 1, 1)
        return value.permute(0, 2, 1).reshape(*target_shape).contiguous()
    return value


def component_state(source: ModelSource, component: str, model: nn.Module, variant: str | None,
                    extra: dict | None = None) -> dict:
    """The state dict for ``model`` from a diffusers or converted folder (plus ``extra`` weights, e.g. a
    motion adapter's), names and shapes checked."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if source.kind == "mlx":
        path = source.root / component / "weights.safetensors"
        state = {**load_torch_weights(path), **(extra or {})}
        check_names(expected, state, str(path), type(model).__name__)
        state = {k: mlx_to_torch_layout(v, expected[k]) for k, v in state.items()}
    else:
        path = local_weight_file(source.root, component, variant)
        files = shard_files(path) if path.name.endswith(".json") else [path]
        raw: dict = {}
        for f in files:
            raw.update(load_torch_weights(f))
        state = {**map_keys(raw, RULES[component]), **(extra or {})}
        check_names(expected, state, str(path), type(model).__name__)
    check_shapes(state, expected, str(path))
    return state


def load_components(source: ModelSource, dtypes: dict[str, torch.dtype], device: torch.device,
                    variant: str | None = None, motion_adapter: MotionAdapterSource | None = None
                    ) -> dict[str, nn.Module]:
    motion_weights, motion_config = {}, None
    if motion_adapter is not None:
        motion_weights, motion_config = motion_state(motion_adapter, load_torch_weights)
    modules = {}
    for component in MODEL_COMPONENTS:
        unet = component == "unet"
        # Built on the meta device and filled by assignment: the checkpoint's tensors become the
        # parameters, so no random initialisation and no second copy of the weights is ever made.
        with torch.device("meta"):
            model = build_component(source.root, component, motion_config if unet else None)
        state = component_state(source, component, model, variant, motion_weights if unet else None)
        model.load_state_dict(state, strict=True, assign=True)
        modules[component] = model.to(device=device, dtype=dtypes[component]).eval().requires_grad_(False)
    return modules
