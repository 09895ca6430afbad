"""Positive numbers read from environment variables, refused by name when malformed.

A typo in a setting (``MLX_STABLEFUSED_MAX_PIXELS=lots``) must stop the run with the variable's name, not
fall back to a default silently.
"""

from __future__ import annotations

import math
import os
from typing import TypeVar

Number = TypeVar("Number", int, float)


def positive_from_env(name: str, default: Number, kind: type[Number], unit: str) -> Number:
    """``name``'s value as a positive ``kind`` (int or float), ``default`` when unset or empty."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    noun = "integer" if kind is int else "number"
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} must be a positive {noun} ({unit})") from None
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name}={text!r} must be a positive {noun} ({unit})")
    return value
