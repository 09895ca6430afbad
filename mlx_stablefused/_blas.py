"""Use a system OpenBLAS for MLX's CPU build on Linux, when one is installed.

MLX's Linux CPU wheel links a reference BLAS (about 3 GFLOP/s for a large matmul on a
2-core x86 machine); OpenBLAS loaded globally before ``mlx.core`` is imported makes MLX
resolve its BLAS calls there instead (about 125 GFLOP/s on the same machine). Debian and
Ubuntu: ``apt-get install libopenblas0-pthread``; MLX_STABLEFUSED_OPENBLAS=/path/libopenblas.so.0
names one elsewhere (conda, a build of your own). Set MLX_STABLEFUSED_NO_OPENBLAS=1 to opt out. On macOS MLX uses Accelerate and Metal, and nothing is done here.

The status names the kernels OpenBLAS chose (``openblas_get_corename``): an OPENBLAS_CORETYPE in the
environment forces them (Haswell's AVX2 kernels on an AVX-512 CPU ran the UNet's products at 99 instead of
181-197 GFLOP/s on one core of a 2-core EPYC with AVX-512, measured), and OpenBLAS reads it as it loads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import warnings

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

status: str = "not attempted"
_library: ctypes.CDLL | None = None


def preload_openblas() -> str:
    """Load OpenBLAS with RTLD_GLOBAL if possible; return a one-line status for diagnostics."""
    global status, _library
    if not sys.platform.startswith("linux"):
        status = "not needed (not Linux)"
    elif os.environ.get("MLX_STABLEFUSED_NO_OPENBLAS"):
        status = "disabled by MLX_STABLEFUSED_NO_OPENBLAS"
    elif "mlx.core" in sys.modules:
        status = "skipped: mlx.core was imported before mlx_stablefused"
        _warn_if_skipped_openblas()
    elif os.environ.get("MLX_STABLEFUSED_OPENBLAS"):
        path = os.environ["MLX_STABLEFUSED_OPENBLAS"]
        try:  # named explicitly: a failure is an error, not a silent fall-back to the slow BLAS
            _library = ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
        except OSError as error:
            raise ValueError(f"MLX_STABLEFUSED_OPENBLAS={path} could not be loaded: {error}") from None
        status = f"loaded {path}"
    else:
        paths = _system_openblas()
        status = "no OpenBLAS found (apt-get install libopenblas0-pthread makes MLX's CPU matmul ~40x faster)"
        for path in paths:
            try:
                _library = ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
            except OSError:
                continue
            status = f"loaded {path}"
            break
    if _library is not None:
        status += core_note(_library)
    return status


def _system_openblas() -> list[str]:
    found = ctypes.util.find_library("openblas")
    return ([found] if found else []) + [p for p in CANDIDATES if os.path.exists(p)]


def _warn_if_skipped_openblas() -> None:
    """Say so when an OpenBLAS was there to load but MLX had already bound its own BLAS: an ``import mlx.core``
    before the MLX backend is imported leaves every CPU matrix product ~40x slower, which nothing else shows."""
    named = os.environ.get("MLX_STABLEFUSED_OPENBLAS")
    if named:
        available = named if os.path.exists(named) else None
    else:
        available = next(iter(_system_openblas()), None)
    if available is None or hasattr(ctypes.CDLL(None), "openblas_get_corename"):  # none, or already preloaded
        return
    warnings.warn(f"mlx.core was imported before mlx_stablefused's MLX backend, so MLX's CPU build keeps its "
                  f"bundled reference BLAS (matrix products ~40x slower) instead of the OpenBLAS at {available}: "
                  "import mlx_stablefused.backends.mlx before mlx.core (or set MLX_STABLEFUSED_NO_OPENBLAS=1 to "
                  "keep the bundled BLAS without this warning)", RuntimeWarning, stacklevel=2)


def core_note(library: ctypes.CDLL) -> str:
    """' (core NAME)' as OpenBLAS reports the kernels it chose; '' for a BLAS that does not say."""
    corename = getattr(library, "openblas_get_corename", None)
    if corename is None:
        return ""
    corename.restype = ctypes.c_char_p
    name = corename()
    return f" (core {name.decode(errors='replace')})" if name else ""


def set_threads(count: int) -> bool:
    """Set the preloaded OpenBLAS's thread count; False when no OpenBLAS was loaded here.

    When several MLX CPU streams run matrix products at once (see ``backends.mlx.cpu_streams``), each
    should get its share of the cores, not all of them: oversubscribed OpenBLAS threads spin and wait.
    """
    setter = getattr(_library, "openblas_set_num_threads", None) if _library is not None else None
    if setter is None:
        return False
    setter(max(1, int(count)))
    return True
