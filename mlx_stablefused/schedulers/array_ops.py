"""The few array operations the samplers need beyond arithmetic, for numpy, MLX and torch arrays.

Samplers are written once for every backend: their step arithmetic uses only
``+ - * /`` with Python floats, which all three array types share, plus these helpers.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _framework(x: Any) -> str:
    module = type(x).__module__
    if module.startswith("mlx"):
        return "mlx"
    if module.startswith("torch"):
        return "torch"
    return "numpy"


def clip(x: Any, low: float, high: float) -> Any:
    kind = _framework(x)
    if kind == "mlx":
        import mlx.core as mx

        return mx.clip(x, low, high)
    if kind == "torch":
        return x.clamp(low, high)
    return np.clip(x, low, high)
