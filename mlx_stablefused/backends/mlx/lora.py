"""LoRA on the MLX networks: each patched layer's class is swapped for a subclass that adds the low-rank
terms to its output, so parameter names, quantization (``QuantizedLinear`` layers included) and the
converted-file checks see the plain layer; fusing replaces the weight array and keeps the original."""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ...lora import LORA_COMPONENTS, LoRATerm, TargetLayer


class _LowRankTerms:
    """The sum of a layer's active terms as two products: ``(x @ down) @ up``, every adapter's factor folded
    into ``up`` and the adapters stacked along the rank axis. A plain object: not part of the parameter tree."""

    def __init__(self, layer: nn.Module, terms: Sequence[LoRATerm], dtype: mx.Dtype) -> None:
        up = np.concatenate([np.float32(t.factor) * t.up for t in terms], axis=1)  # (out, R)
        self.up = mx.array(np.ascontiguousarray(up.T)).astype(dtype)  # (R, out)
        down = np.concatenate([t.down for t in terms], axis=0)  # (R, in) or (R, in, kh, kw)
        if down.ndim == 2:
            self.down = mx.array(np.ascontiguousarray(down.T)).astype(dtype)  # (in, R)
            self.conv = None
        else:  # a convolution of the layer's own kind (strips for large inputs), R output channels, no bias
            kernel = mx.array(np.ascontiguousarray(down.transpose(0, 2, 3, 1))).astype(dtype)
            conv = _plain_class(layer)(kernel.shape[-1], kernel.shape[0], kernel.shape[1:3], stride=layer.stride,
                                       padding=layer.padding, dilation=layer.dilation, bias=False)
            conv.weight = kernel
            self.conv = conv

    def __call__(self, x: mx.array) -> mx.array:
        h = x @ self.down if self.conv is None else self.conv(x)
        return h @ self.up


class _WithLoRA:
    """Mixed in before a layer class: its output plus the low-rank terms."""

    def __call__(self, x: mx.array) -> mx.array:
        return super().__call__(x) + self._lora_terms(x)


_LORA_CLASSES: dict[type, type] = {}


def _plain_class(layer: nn.Module) -> type:
    cls = type(layer)
    return cls.__bases__[1] if issubclass(cls, _WithLoRA) else cls


def _lora_class(cls: type) -> type:
    if cls not in _LORA_CLASSES:
        _LORA_CLASSES[cls] = type(f"LoRA{cls.__name__}", (_WithLoRA, cls), {})
    return _LORA_CLASSES[cls]


def _target(layer: nn.Module) -> TargetLayer | None:
    if isinstance(layer, nn.QuantizedLinear):
        return TargetLayer(layer.weight.shape[0], layer.weight.shape[1] * 32 // layer.bits, quantized=True)
    if isinstance(layer, nn.Linear):
        return TargetLayer(*layer.weight.shape)
    if isinstance(layer, nn.Conv2d) and layer.groups == 1:
        o, kh, kw, i = layer.weight.shape
        return TargetLayer(o, i, (kh, kw))
    return None


class MLXLoRAHost:
    """``lora.LoRAHost`` for an ``MLXBackend``: module paths are diffusers' names (the modules mirror them)."""

    def __init__(self, backend) -> None:
        self.backend = backend
        self._originals: dict[tuple[str, str], mx.array] = {}
        self._modules: dict[str, dict[str, nn.Module]] = {}  # read afresh by lora_targets (quantize replaces layers)

    def lora_targets(self) -> dict[str, dict[str, TargetLayer]]:
        out: dict[str, dict[str, TargetLayer]] = {}
        self._modules = {}
        for name in LORA_COMPONENTS:
            if name in self.backend.components:
                self._modules[name] = dict(self.backend.components[name].named_modules())
                out[name] = {p: t for p, m in self._modules[name].items() if (t := _target(m)) is not None}
        return out

    def _layer(self, component: str, path: str) -> nn.Module:
        if component not in self._modules:
            self.lora_targets()
        return self._modules[component][path]

    def set_terms(self, component: str, path: str, terms: Sequence[LoRATerm]) -> None:
        layer = self._layer(component, path)
        plain = _plain_class(layer)
        if not terms:
            layer.__class__ = plain
            layer.__dict__.pop("_lora_terms", None)
            return
        dtype = layer.scales.dtype if isinstance(layer, nn.QuantizedLinear) else layer.weight.dtype
        layer.__class__ = _lora_class(plain)
        layer._lora_terms = _LowRankTerms(layer, terms, dtype)

    def add_to_weight(self, component: str, path: str, delta: np.ndarray) -> None:
        layer = self._layer(component, path)
        original = self._originals.setdefault((component, path), layer.weight)
        mlx_delta = delta.transpose(0, 2, 3, 1) if delta.ndim == 4 else delta
        layer.weight = (original.astype(mx.float32) + mx.array(np.ascontiguousarray(mlx_delta))).astype(original.dtype)
        mx.eval(layer.weight)

    def restore_weight(self, component: str, path: str) -> None:
        self._layer(component, path).weight = self._originals.pop((component, path))

    def forget_weight(self, component: str, path: str) -> None:
        self._originals.pop((component, path), None)

    def lora_changed(self) -> None:
        self.backend.unet_changed()
