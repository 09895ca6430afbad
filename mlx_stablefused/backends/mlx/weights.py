"""MLX side of weight loading: PyTorch layouts to MLX layouts, and strict loading into MLX modules."""

from __future__ import annotations

from typing import Iterable, Mapping

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ...weights import Rule, check_names, check_shapes, map_keys


def torch_to_mlx_layout(value: mx.array, target_shape: tuple[int, ...]) -> mx.array:
    """Convert one PyTorch-layout tensor to the layout of the MLX parameter it fills (shape unchecked)."""
    if value.ndim == 5 and len(target_shape) == 3 and value.shape[3:] == (1, 1):
        # a (k, 1, 1) Conv3d over frames held as Conv1d: (O, I, k, 1, 1) -> (O, k, I)
        return value.reshape(value.shape[:3]).transpose(0, 2, 1)
    if value.ndim == 4:
        if len(target_shape) == 4:
            return value.transpose(0, 2, 3, 1)
        if len(target_shape) == 2 and value.shape[2:] == (1, 1):
            return value.reshape(value.shape[0], value.shape[1])
    return value



def check_keys(model: nn.Module, weights: Mapping[str, mx.array], source: str) -> dict[str, tuple[int, ...]]:
    """Raise unless ``weights`` has exactly the MLX model's parameter names; return the expected shapes."""
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    return check_names(expected, weights, source, type(model).__name__)



def convert_state(model: nn.Module, state: Mapping[str, mx.array], rules: Iterable[Rule],
                  dtype: mx.Dtype | None = None) -> dict[str, mx.array]:
    """Map a PyTorch-layout checkpoint onto ``model``'s names and layouts (lazily; nothing is evaluated).

    Keys the model lacks pass through unchanged: the strict check happens when weights are applied
    (a model may take its weights from several files, as a motion UNet does).
    """
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    mapped = map_keys(state, rules)
    out = {k: torch_to_mlx_layout(v, expected[k]) if k in expected else v for k, v in mapped.items()}
    return {k: cast(v, dtype) for k, v in out.items()}



def cast(value: mx.array, dtype: mx.Dtype | None) -> mx.array:
    if dtype is not None and mx.issubdtype(value.dtype, mx.floating) and value.dtype != dtype:
        return value.astype(dtype)
    return value



def apply_weights(model: nn.Module, weights: Mapping[str, mx.array], source: str,
                  dtype: mx.Dtype | None = None) -> nn.Module:
    """Load MLX-layout ``weights`` into ``model`` strictly (names and shapes must match exactly)."""
    expected = check_keys(model, weights, source)
    check_shapes(weights, expected, source)
    model.update(tree_unflatten([(k, cast(v, dtype)) for k, v in weights.items()]))
    return model
