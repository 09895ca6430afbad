"""LoRA on the torch networks: a forward hook adds the low-rank terms to a patched layer's output (the
module and its parameter names stay as they are); fusing adds to the weight in place, keeping a copy of
the original to restore."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...lora import LORA_COMPONENTS, LoRATerm, TargetLayer


def _target(layer: nn.Module) -> TargetLayer | None:
    if isinstance(layer, nn.Linear):
        return TargetLayer(layer.out_features, layer.in_features)
    if isinstance(layer, nn.Conv2d) and layer.groups == 1:
        return TargetLayer(layer.out_channels, layer.in_channels, tuple(layer.kernel_size))
    return None


class _LowRankHook:
    """``output + (up o down)(input)``, all adapters stacked along the rank axis, factors folded into ``up``."""

    def __init__(self, layer: nn.Module, terms: Sequence[LoRATerm]) -> None:
        w = layer.weight
        as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device=w.device, dtype=w.dtype)  # noqa: E731
        self.down = as_tensor(np.concatenate([t.down for t in terms], axis=0))
        self.up = as_tensor(np.concatenate([np.float32(t.factor) * t.up for t in terms], axis=1))
        if isinstance(layer, nn.Conv2d):
            self.up = self.up[:, :, None, None]
            if self.down.ndim == 2:
                self.down = self.down[:, :, None, None]

    def __call__(self, layer: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        if isinstance(layer, nn.Conv2d):
            h = F.conv2d(x, self.down, None, layer.stride, layer.padding, layer.dilation)
            return output + F.conv2d(h, self.up)
        return output + F.linear(F.linear(x, self.down), self.up)


class TorchLoRAHost:
    """``lora.LoRAHost`` for a ``TorchBackend``."""

    def __init__(self, backend) -> None:
        self.backend = backend
        self._hooks: dict[tuple[str, str], torch.utils.hooks.RemovableHandle] = {}
        self._originals: dict[tuple[str, str], torch.Tensor] = {}

    def _layer(self, component: str, path: str) -> nn.Module:
        return self.backend.components[component].get_submodule(path)

    def lora_targets(self) -> dict[str, dict[str, TargetLayer]]:
        out: dict[str, dict[str, TargetLayer]] = {}
        for name in LORA_COMPONENTS:
            if name in self.backend.components:
                modules = self.backend.components[name].named_modules()
                out[name] = {p: t for p, m in modules if (t := _target(m)) is not None}
        return out

    def set_terms(self, component: str, path: str, terms: Sequence[LoRATerm]) -> None:
        handle = self._hooks.pop((component, path), None)
        if handle is not None:
            handle.remove()
        if terms:
            layer = self._layer(component, path)
            self._hooks[(component, path)] = layer.register_forward_hook(_LowRankHook(layer, terms))

    @torch.no_grad()
    def add_to_weight(self, component: str, path: str, delta: np.ndarray) -> None:
        weight = self._layer(component, path).weight
        self._originals.setdefault((component, path), weight.detach().clone())
        d = torch.from_numpy(np.ascontiguousarray(delta)).to(weight.device).reshape(weight.shape)
        weight.copy_((weight.float() + d).to(weight.dtype))

    @torch.no_grad()
    def restore_weight(self, component: str, path: str) -> None:
        self._layer(component, path).weight.copy_(self._originals.pop((component, path)))

    def forget_weight(self, component: str, path: str) -> None:
        self._originals.pop((component, path), None)

    def lora_changed(self) -> None:
        pass
