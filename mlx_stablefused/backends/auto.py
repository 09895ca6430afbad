"""``backend="auto"``: pick the backend that is fastest on this machine, and say which and why.

The rule, in order (explicit ``backend="mlx"`` / ``"torch"`` always wins; ``MLX_STABLEFUSED_BACKEND``
names one for every "auto" in the process):

1. Apple Silicon with MLX installed: MLX, on Metal (the port's production target).
2. An NVIDIA GPU that torch can use: torch on CUDA.
3. MLX's own GPU build (MLX on CUDA) where torch has no CUDA: MLX.
4. A machine with only a CPU: torch when it is installed, else MLX. torch was faster than MLX's CPU
   build on both CPUs measured (README, Performance): on a 2-core AVX-only EPYC 0.80x vs 1.00x of
   diffusers' time per step at 256x256 and 1.01x vs 1.98x at 512x512; on a 2-core AVX-512/AMX Xeon
   1.03x vs 1.63x. Its oneDNN kernels are vectorised and threaded where MLX's CPU kernels run one
   thread per stream, so the rule does not depend on the CPU's vector width.

A ``device`` asked for narrows the choice: ``cuda``/``mps`` exist only on torch, ``gpu`` only on MLX.
Detection imports no framework it does not need: installed means importable (``find_spec``); torch is
imported to ask whether CUDA (or MPS) is there, and then MLX (through its backend package, so the OpenBLAS
preload still comes first) only where torch has no CUDA, to ask whether this MLX build has a GPU.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import platform
from dataclasses import dataclass
from typing import Callable

logger = logging.getLogger(__name__)

AUTO = "auto"
ENVIRONMENT_VARIABLE = "MLX_STABLEFUSED_BACKEND"
TORCH_ONLY_DEVICES = ("cuda", "mps")
MLX_ONLY_DEVICES = ("gpu",)


@dataclass(frozen=True)
class BackendChoice:
    name: str  # "mlx" or "torch"
    reason: str

    def __str__(self) -> str:
        return f"backend: {self.name} ({self.reason})"


@dataclass(frozen=True)
class MachineFacts:
    """What the rule looks at; ``detect`` reads it from this machine (tests pass their own)."""

    apple_silicon: bool
    mlx_installed: bool
    torch_installed: bool
    cuda_device: str | None = None  # torch's name for its first CUDA device, when there is one
    torch_mps: bool = False
    mlx_gpu: bool = False  # MLX's GPU build (Metal, or MLX on CUDA)

    @classmethod
    def detect(cls) -> "MachineFacts":
        apple = platform.system() == "Darwin" and platform.machine() == "arm64"
        has_mlx = importlib.util.find_spec("mlx") is not None
        has_torch = importlib.util.find_spec("torch") is not None
        cuda, mps, mlx_gpu = None, False, False
        if has_torch and not (apple and has_mlx):
            import torch

            if torch.cuda.is_available():
                cuda = torch.cuda.get_device_name(0)
            mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
        if has_mlx and cuda is None and not apple:
            from . import mlx as _openblas_first  # noqa: F401  (MLX's CPU build needs OpenBLAS loaded before it)
            import mlx.core as mx

            mlx_gpu = bool(mx.is_available(mx.gpu))
        return cls(apple, has_mlx, has_torch, cuda, mps, mlx_gpu)


def choose_backend(facts: MachineFacts, device: str | None = None) -> BackendChoice:
    """The rule in this module's docstring, as a pure function of ``facts`` (and the device asked for)."""
    kind = device.split(":")[0] if device else None
    if kind in TORCH_ONLY_DEVICES:
        return BackendChoice("torch", f"device={device!r} exists only on the torch backend")
    if kind in MLX_ONLY_DEVICES:
        return BackendChoice("mlx", f"device={device!r} exists only on the MLX backend")
    if kind != "cpu":
        if facts.apple_silicon and facts.mlx_installed:
            return BackendChoice("mlx", "Apple Silicon: MLX on Metal")
        if facts.torch_installed and facts.cuda_device:
            return BackendChoice("torch", f"NVIDIA GPU ({facts.cuda_device}): torch on CUDA")
        if facts.mlx_installed and facts.mlx_gpu:
            return BackendChoice("mlx", "MLX's GPU build, and no CUDA device for torch")
        if facts.torch_installed and facts.torch_mps:
            return BackendChoice("torch", "Apple GPU through torch's MPS (MLX is not installed)")
    if facts.torch_installed:
        return BackendChoice("torch", "no GPU: torch runs faster than MLX's CPU build on the CPUs measured, "
                                      "0.80-1.03x vs 1.00-1.98x of diffusers' time, README Performance")
    if facts.mlx_installed:
        return BackendChoice("mlx", "no GPU, and PyTorch is not installed")
    raise ImportError("neither MLX (pip install mlx) nor PyTorch (pip install torch) is installed")


def resolve_backend(name: str, device: str | None = None,
                    facts: Callable[[], MachineFacts] = MachineFacts.detect) -> BackendChoice:
    """``name`` as a concrete backend: itself, or for "auto" the environment variable's or the rule's
    choice (logged at INFO, as the one line that says which and why)."""
    if name != AUTO:
        return BackendChoice(name, "asked for")
    named = os.environ.get(ENVIRONMENT_VARIABLE, "").strip()
    if named:
        if named not in ("mlx", "torch"):
            raise ValueError(f"{ENVIRONMENT_VARIABLE}={named!r}: expected 'mlx' or 'torch'")
        choice = BackendChoice(named, f"{ENVIRONMENT_VARIABLE}={named}")
    else:
        choice = choose_backend(facts(), device)
    logger.info("%s", choice)
    return choice
