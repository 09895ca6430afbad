"""Keep freed memory in the process between denoising steps (glibc on Linux, torch on the CPU).

glibc serves large blocks with ``mmap`` and trims the heap top as soon as it is free. A UNet step
allocates and frees activations of tens of megabytes (GEGLU projections, attention buffers); each
step then page-faults them back in from the kernel, zero-filled: about 1.2 million faults per
SD 1.5 step at 256x256, measured, which made the torch backend ~20% slower than the same modules in
a process whose allocation history happened to raise glibc's dynamic thresholds (diffusers'
loading does). Switching trimming and mmap'd blocks off once makes every process behave like the
lucky one, at every size. Peak memory is unchanged (freed blocks are reused, not added to); memory
freed after a run stays with the process for the next run, as MLX's and torch's GPU buffer caches keep it.
Set MLX_STABLEFUSED_NO_MALLOC_TUNING=1 to leave glibc's defaults alone.

Both backends use it on the CPU. MLX's CPU build has no buffer cache (its allocator calls malloc; a
64 MB array costs 16385 faults on every allocation, measured), so without the tuning each kernel's
output was faulted in afresh: 5.7M faults per benchmark run, and a 3x3 convolution at 256x256x128
took 155 instead of 114 ms. Freed heap is reused by whatever is allocated next, so the MLX backend
bounds its run-ahead on the CPU (backends/mlx/cpu_memory.py): a pass that allocated everything ahead
would set the high-water mark the process then keeps.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

status: str = "not attempted"


def keep_freed_memory() -> str:
    """Never trim the heap and never serve a block with its own ``mmap``; returns a one-line status.

    Both are glibc's documented switches (mallopt(3): M_TRIM_THRESHOLD -1 disables trimming, M_MMAP_MAX 0
    disables mmap'd blocks). Thresholds of 1 GiB, used before, were not enough: a guided SD 1.5 step at
    512x512 frees and re-allocates more than that, and still took 1.3-1.6 million faults per UNet call
    (28-36 s on this project's 2-core EPYC); with no trimming 0-50 thousand (21 s), measured."""
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
            ok = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, -1) == 1
            status = "glibc keeps freed memory (no trimming, no mmap'd blocks)" if ok else "glibc refused the settings"
    return status
