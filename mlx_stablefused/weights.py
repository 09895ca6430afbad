"""Checkpoint keys to model parameters: mapping tables, layout transforms, strict loading.

The MLX modules use diffusers' / transformers' attribute names, so most keys map to
themselves. What differs is written down as data: a table of ``Rule``s per network kind
(full-key regex -> replacement, or ``None`` to drop a non-weight buffer; the tables live in
``model_description``), applied first-match-wins and never chained. Layout follows from the
array itself: every 4-D tensor in a PyTorch-layout checkpoint is a convolution kernel (O, I, kh, kw), which
becomes (O, kh, kw, I) for an MLX Conv2d or (O, I) for a 1x1 convolution held as Linear.

Loading is strict: a missing, unexpected or mis-shaped key raises ``WeightLoadError``
naming every offender, so a model can never run with weights left at random init. The layout
transforms and the assignment into modules are per backend (``backends/*/loading.py``), the
loading flow is ``model_loading``; this module imports no framework.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from .errors import WeightLoadError


@dataclass(frozen=True)
class Rule:
    pattern: str
    replacement: str | None  # None drops the key (buffers such as position_ids)

    def apply(self, key: str) -> tuple[bool, str | None]:
        m = re.fullmatch(self.pattern, key)
        if not m:
            return False, key
        return True, None if self.replacement is None else m.expand(self.replacement)


def map_keys(state: Mapping[str, Any], rules: Iterable[Rule]) -> dict[str, Any]:
    rules = list(rules)
    out: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for key, value in state.items():
        target = key
        for rule in rules:
            matched, mapped = rule.apply(key)
            if matched:
                target = mapped
                break
        if target is None:
            continue
        if target in out:
            raise WeightLoadError(f"checkpoint keys {origin[target]!r} and {key!r} both map to {target!r}")
        out[target] = value
        origin[target] = key
    return out


def _describe(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def check_names(expected: Mapping[str, tuple[int, ...]], weights: Mapping[str, object], source: str,
                model_name: str) -> dict[str, tuple[int, ...]]:
    """Raise unless ``weights`` has exactly the ``expected`` names, naming every missing and unexpected one."""
    expected = dict(expected)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: {_describe(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {_describe(unexpected)}")
        raise WeightLoadError(f"{source} does not match {model_name}: " + "; ".join(parts))
    return expected


def check_shapes(weights: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], source: str,
                 original: Mapping[str, Any] | None = None) -> None:
    """Raise naming every weight whose shape differs from the model's; ``original`` (the tensors as the
    file holds them, before a layout change) lets the message give the checkpoint's own shape too."""
    def describe(k: str, v: Any) -> str:
        here = tuple(v.shape)
        if original is not None and k in original and tuple(original[k].shape) != here:
            return (f"{k!r} has shape {tuple(original[k].shape)} in the checkpoint ({here} in this backend's "
                    f"layout) but the model expects {expected[k]}")
        return f"{k!r} has shape {here} but the model expects {expected[k]}"

    bad = [describe(k, v) for k, v in weights.items() if tuple(v.shape) != expected[k]]
    if bad:
        raise WeightLoadError(f"{source}: {len(bad)} weight(s) with the wrong shape: " + "; ".join(bad[:12])
                              + (f" ... (+{len(bad) - 12} more)" if len(bad) > 12 else ""))


# ------------------------------------------------------------------------- tensors taken from other files
# A key map names, for each parameter, the tensor of a foreign checkpoint it is made of and how:
# ``{our_name: (their_key, op)}`` with op ``()`` (as is), ``("matrix",)`` (a 1x1 convolution kernel held
# as a Linear weight), ``("rows", i, n)`` (the i-th of n equal row blocks: a fused q/k/v projection) or
# ``("transpose",)`` (a matrix stored as x @ W, OpenCLIP's text_projection, held as a Linear's W.T).
KeyMap = Mapping[str, tuple[str, tuple]]


def transformed_shape(shape: tuple[int, ...], op: tuple) -> tuple[int, ...]:
    """The shape a tensor of ``shape`` has after ``op`` (for config inference on headers alone)."""
    if not op:
        return tuple(shape)
    if op[0] == "matrix":
        return tuple(shape[:2])
    if op[0] == "rows":
        return (shape[0] // op[2], *shape[1:])
    if op[0] == "transpose":
        return tuple(shape[::-1])
    raise ValueError(f"unknown tensor op {op!r}")


def transform(value: Any, op: tuple) -> Any:
    """``op`` applied to a framework array (MLX or torch: only slicing, reshape and ``.T`` are used)."""
    if not op:
        return value
    if op[0] == "matrix":
        return value.reshape(value.shape[0], value.shape[1]) if value.ndim > 2 else value
    if op[0] == "rows":
        size = value.shape[0] // op[2]
        return value[op[1] * size:(op[1] + 1) * size]
    if op[0] == "transpose":
        return value.T
    raise ValueError(f"unknown tensor op {op!r}")


def take(state: Mapping[str, Any], key_map: KeyMap, source: str) -> dict[str, Any]:
    """The tensors ``key_map`` asks for, out of ``state`` (a checkpoint's tensors under its own keys)."""
    missing = sorted({k for k, _ in key_map.values()} - set(state))
    if missing:
        raise WeightLoadError(f"{source} lacks {len(missing)} tensor(s): {_describe(missing)}")
    return {name: transform(state[key], op) for name, (key, op) in key_map.items()}
