"""What the torch backend contributes to loading: its module classes, PyTorch layout, and assignment.

Modules are built on the meta device and filled by assignment: the checkpoint's tensors become the
parameters, so no random initialisation and no second copy of the weights is ever made. The flow
(files, configs, key rules, strict checks, dtypes) is ``mlx_stablefused.model_loading``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ... import model_loading
from ...checkpoint_io import load_torch_tensors, load_torch_weights
from ...model_description import ModuleKind
from ...sources import ModelSource
from .clip import CLIPTextModel, CLIPTextModelWithProjection
from .clip_vision import CLIPVisionModelWithProjection
from .controlnet import ControlNetModel
from .unet import UNet2DConditionModel
from .unet3d import UNet3DConditionModel
from .tiny_vae import AutoencoderTiny
from .vae import AutoencoderKL

def mlx_to_torch_layout(value: torch.Tensor, target_shape: tuple[int, ...]) -> torch.Tensor:
    """Undo the converter's layout: (O, kh, kw, I) kernels and 1x1 convolutions held as (O, I)."""
    if value.ndim == 4 and len(target_shape) == 4:
        return value.permute(0, 3, 1, 2).contiguous()
    if value.ndim == 2 and len(target_shape) == 4 and target_shape[2:] == (1, 1):
        return value.reshape(*value.shape, 1, 1)
    if value.ndim == 3 and len(target_shape) == 5:  # Conv1d over frames (O, k, I) -> Conv3d (O, I, k, 1, 1)
        return value.permute(0, 2, 1).reshape(*target_shape).contiguous()
    return value


class TorchNetworks(model_loading.Networks):
    name = "torch"
    layout = model_loading.DIFFUSERS_LAYOUT
    classes = {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection,
               "UNet2DConditionModel": UNet2DConditionModel,
               "UNet3DConditionModel": UNet3DConditionModel, "AutoencoderKL": AutoencoderKL,
               "AutoencoderTiny": AutoencoderTiny, "CLIPVisionModelWithProjection": CLIPVisionModelWithProjection,
               "ControlNetModel": ControlNetModel}
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)

    def build(self, kind: ModuleKind, config: Any, **extra: Any) -> nn.Module:
        with torch.device("meta"):
            return super().build(kind, config, **extra)

    def parameter_shapes(self, module: nn.Module) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in module.state_dict().items()}

    def read(self, path: Path) -> dict[str, torch.Tensor]:
        return load_torch_weights(path)

    def read_keys(self, path: Path, keys: set[str]) -> dict[str, torch.Tensor]:
        """Only these tensors: a safetensors file is opened in place, a pickle memory-mapped."""
        return load_torch_tensors(path, keys)

    def to_native(self, value: torch.Tensor, target_shape: tuple[int, ...], layout: str) -> torch.Tensor:
        return value if layout == self.layout else mlx_to_torch_layout(value, target_shape)

    def assign(self, module: nn.Module, weights: Mapping[str, torch.Tensor], dtype: str) -> nn.Module:
        module.load_state_dict(dict(weights), strict=True, assign=True)
        return module.to(device=self.device, dtype=self.dtypes[dtype]).eval().requires_grad_(False)


def load_model(source: ModelSource, dtype: str = "float32", device: str | torch.device = "cpu",
               **options: Any) -> model_loading.LoadedModel:
    """``model_loading.load_model`` with the torch modules, placed on ``device``."""
    return model_loading.load_model(source, TorchNetworks(device), dtype, **options)
