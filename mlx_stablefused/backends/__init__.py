"""Framework backends behind one interface (see base.Backend)."""

from __future__ import annotations

from typing import Any

from .base import Backend

BACKENDS = ("mlx", "torch")
BACKEND_CHOICES = ("auto", *BACKENDS)  # "auto": see backends/auto.py


def create_backend(name: str, source: Any, **options: Any) -> Backend:
    """Instantiate backend ``name`` ("auto" picks one, see ``auto``) for the model at ``source``; imports the
    framework only when asked."""
    if name == "auto":
        from .auto import resolve_backend

        name = resolve_backend(name, options.get("device")).name
    if name == "mlx":
        from .mlx.backend import MLXBackend

        return MLXBackend(source, **options)
    if name == "torch":
        try:
            from .torch.backend import TorchBackend
        except ImportError as e:
            raise ImportError("the torch backend needs PyTorch: pip install 'mlx-stablefused[torch]'") from e
        return TorchBackend(source, **options)
    raise ValueError(f"unknown backend {name!r}; available: {', '.join(BACKEND_CHOICES)}")
