"""What the MLX backend contributes to loading: its module classes, MLX layout, and assignment.

The loading flow itself (files, configs, key rules, strict checks, dtypes, the conversion cache)
is ``mlx_stablefused.model_loading``; the folder format is ``mlx_stablefused.converted_format``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ... import model_loading
from ...checkpoint_io import load_tensors, load_weights, save_safetensors
from ...converted_format import LAYOUT
from ...model_description import STABLE_DIFFUSION, ModelDescription
from ...sources import ModelSource
from .clip import CLIPTextModel, CLIPTextModelWithProjection
from .clip_vision import CLIPVisionModelWithProjection
from .controlnet import ControlNetModel
from .unet import UNet2DConditionModel
from .unet3d import UNet3DConditionModel
from .tiny_vae import AutoencoderTiny
from .vae import AutoencoderKL
from .weights import cast, torch_to_mlx_layout

class MLXNetworks(model_loading.Networks):
    name = "mlx"
    layout = LAYOUT
    classes = {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection,
               "UNet2DConditionModel": UNet2DConditionModel,
               "UNet3DConditionModel": UNet3DConditionModel, "AutoencoderKL": AutoencoderKL,
               "AutoencoderTiny": AutoencoderTiny, "CLIPVisionModelWithProjection": CLIPVisionModelWithProjection,
               "ControlNetModel": ControlNetModel}
    dtypes = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}

    def parameter_shapes(self, module: nn.Module) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in tree_flatten(module.parameters())}

    def read(self, path: Path) -> dict[str, mx.array]:
        return load_weights(path)

    def read_keys(self, path: Path, keys: set[str]) -> dict[str, mx.array]:
        return load_tensors(path, keys)

    def to_native(self, value: mx.array, target_shape: tuple[int, ...], layout: str) -> mx.array:
        return value if layout == self.layout else torch_to_mlx_layout(value, target_shape)

    def cast(self, value: mx.array, dtype: str) -> mx.array:
        return cast(value, self.dtypes[dtype])

    def assign(self, module: nn.Module, weights: Mapping[str, mx.array], dtype: str) -> nn.Module:
        module.update(tree_unflatten([(k, cast(v, self.dtypes[dtype])) for k, v in weights.items()]))
        return module.eval()

    def save(self, path: Path, weights: Mapping[str, mx.array], metadata: dict[str, str]) -> None:
        save_safetensors(path, dict(weights), metadata=metadata)


NETWORKS = MLXNetworks()


def convert_model(source: ModelSource, destination: str | Path, *, dtype: str = "float16",
                  variant: str | None = None, overwrite: bool = False,
                  description: ModelDescription = STABLE_DIFFUSION) -> Path:
    """Convert a diffusers model to an MLX folder: MLX-layout safetensors, configs, tokenizer, manifest.

    The folder is assembled under a temporary name and renamed into place when complete.
    """
    return model_loading.convert_model(source, destination, NETWORKS, dtype=dtype, variant=variant,
                                       overwrite=overwrite, description=description)


def load_model(source: ModelSource, dtype: str = "float32", **options: Any) -> model_loading.LoadedModel:
    """``model_loading.load_model`` with the MLX modules."""
    return model_loading.load_model(source, NETWORKS, dtype, **options)
