"""Keep freed memory in the process between denoising steps (glibc on Linux, torch on the CPU).

glibc serves large blocks with ``mmap`` and trims the heap top as soon as it is free. A UNet step
allocates and frees activations of tens of megabytes (GEGLU projections, attention buffers); each
step then page-faults them back in from the kernel, zero-filled: about 1.2 million faults per
SD 1.5 step at 256x256, measured, which made the torch backend ~20% slower than the same modules in
a process whose allocation history happened to raise glibc's dynamic thresholds (diffusers'
loading does). Raising both thresholds once makes every process behave like the lucky one. Peak
memory is unchanged; memory freed after a run stays with the process for the next run.
Set MLX_STABLEFUSED_NO_MALLOC_TUNING=1 to leave glibc's defaults alone.

Both backends use it on the CPU. MLX's CPU build has no buffer cache (its allocator calls malloc; a
64 MB array costs 16385 faults on every allocation, measured), so without the tuning each kernel's
output was faulted in afresh: 5.7M faults per benchmark run, and a 3x3 convolution at 256x256x128
took 155 instead of 114 ms. The tuning retains ~450 MB of freed heap at the peak; the MLX backend
pays for it by bounding its run-ahead during VAE passes (backends/mlx/cpu_memory.py).
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
DEFAULT_LIMIT = 1 << 30

status: str = "not attempted"


def keep_freed_memory(limit: int = DEFAULT_LIMIT) -> str:
    """Serve blocks up to ``limit`` bytes from the heap and never trim less than ``limit``; returns a status."""
    global status
    if not sys.platform.startswith("linux"):
        status = "not needed (not Linux)"
    elif os.environ.get("MLX_STABLEFUSED_NO_MALLOC_TUNING"):
        status = "disabled by MLX_STABLEFUSED_NO_MALLOC_TUNING"
    else:
        try:
            mallopt = ctypes.CDLL("libc.so.6").mallopt
        except (OSError, AttributeError):
            status = "not glibc: left alone"
        else:
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            ok = mallopt(M_MMAP_THRESHOLD, limit) == 1 and mallopt(M_TRIM_THRESHOLD, limit) == 1
            status = f"glibc thresholds raised to {limit >> 20} MiB" if ok else "glibc refused the thresholds"
    return status
