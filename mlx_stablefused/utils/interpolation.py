"""Linear and spherical interpolation of embeddings and latents (any shape), computed in numpy and
returned in the type given: numpy, ``mx.array`` or torch tensor (weights ``t`` may be any of them too)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .array_types import like, to_numpy

ArrayLike = Any  # numpy, mx.array or torch tensor


def _weights(t: Any) -> tuple[np.ndarray, bool]:
    t = to_numpy(t)
    scalar = np.ndim(t) == 0
    return np.atleast_1d(np.asarray(t, dtype=np.float64)), scalar


def lerp(v0: ArrayLike, v1: ArrayLike, t: Any) -> Any:
    """``(1 - t) * v0 + t * v1``; an array ``t`` gives a leading axis with one result per weight."""
    return like(_lerp(to_numpy(v0), to_numpy(v1), t), v0, v1, t)


def _lerp(v0: np.ndarray, v1: np.ndarray, t: Any) -> np.ndarray:
    w, scalar = _weights(t)
    shape = (-1,) + (1,) * v0.ndim
    out = (1 - w).reshape(shape) * v0[None] + w.reshape(shape) * v1[None]
    out = out.astype(np.result_type(v0, v1, np.float32))
    return out[0] if scalar else out


def slerp(v0: ArrayLike, v1: ArrayLike, t: Any, dot_threshold: float = 0.9995, *,
          DOT_THRESHOLD: float | None = None) -> Any:
    """Spherical interpolation with one angle over the whole tensor (as stablefused), falling back to
    lerp when the two are nearly parallel (|cos| > ``dot_threshold``; stablefused's ``DOT_THRESHOLD``)."""
    threshold = dot_threshold if DOT_THRESHOLD is None else DOT_THRESHOLD
    return like(_slerp(to_numpy(v0), to_numpy(v1), t, threshold), v0, v1, t)


def _slerp(v0: np.ndarray, v1: np.ndarray, t: Any, dot_threshold: float) -> np.ndarray:
    a, b = v0.astype(np.float64), v1.astype(np.float64)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return _lerp(v0, v1, t)
    dot = float(np.sum(a * b) / (na * nb))
    if abs(dot) > dot_threshold:
        return _lerp(v0, v1, t)
    w, scalar = _weights(t)
    theta0 = np.arccos(dot)
    sin0 = np.sin(theta0)
    theta = theta0 * w
    s0 = np.sin(theta0 - theta) / sin0
    s1 = np.sin(theta) / sin0
    shape = (-1,) + (1,) * v0.ndim
    out = s0.reshape(shape) * a[None] + s1.reshape(shape) * b[None]
    out = out.astype(np.result_type(v0, v1, np.float32))
    return out[0] if scalar else out


def interpolation_weights(steps: int, include_end: bool) -> np.ndarray:
    """``steps`` weights from 0 towards 1; the last is 1 only with ``include_end``."""
    if steps < 1:
        raise ValueError(f"interpolation steps must be >= 1, got {steps}")
    return np.linspace(0.0, 1.0, steps) if include_end else np.arange(steps) / steps
