"""Give results back in the array type the caller passed (numpy, ``mx.array``, torch tensor), so the
numpy-only utilities (interpolation, normalisation) take and return any of them, as stablefused's did."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np


def is_torch(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def is_mlx(x: Any) -> bool:
    mx = sys.modules.get("mlx.core")
    return mx is not None and isinstance(x, mx.array)


def to_numpy(x: Any) -> np.ndarray:
    """Any of the three (or a float / list) -> numpy, keeping float64 where the input had it."""
    if is_torch(x):
        return x.detach().cpu().numpy()
    if is_mlx(x):
        return np.asarray(x)
    return np.asarray(x)


def like(result: np.ndarray, *inputs: Any) -> Any:
    """``result`` as a torch tensor (on the device of the first tensor input) if any input was one, as an
    ``mx.array`` if any was one, else numpy."""
    for x in inputs:
        if is_torch(x):
            import torch

            return torch.from_numpy(np.ascontiguousarray(result)).to(x.device)
    for x in inputs:
        if is_mlx(x):
            import mlx.core as mx

            return mx.array(result)
    return result
