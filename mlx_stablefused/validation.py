"""The rules for plain numbers, shared by the API, the command line and the utilities (no framework,
no package imports, so any module may use them without an import circle)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def positive_int(value: Any, name: str) -> int:
    """``value`` as an int if it is a positive integer (bools refused), else a ValueError naming ``name``."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def non_negative_int(value: Any, name: str) -> int:
    """``value`` as an int if it is an integer >= 0 (bools refused), else a ValueError naming ``name``."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def finite_float(value: Any, name: str) -> float:
    """``value`` as a float if it is a finite real number, else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def fraction(value: Any, name: str) -> float:
    """A finite number in [0, 1]."""
    v = finite_float(value, name)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return v
