"""Framework backends behind one interface (see base.Backend)."""

from __future__ import annotations

from typing import Any

from .base import Backend

BACKENDS = ("mlx", "torch")


def create_backend(name: str, source: Any, **options: Any) -> Backend:
    """Instantiate backend ``name`` for the model at ``source``; imports the framework only when asked."""
    if name == "mlx":
        from .mlx.backend import MLXBackend

        return MLXBackend(source, **options)
    if name == "torch":
        try:
            from .torch.backend import TorchBackend
        except ImportError as e:
            raise ImportError("the torch backend needs PyTorch: pip install 'mlx-stablefused[torch]'") from e
        return TorchBackend(source, **options)
    raise ValueError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
