"""Bound the memory MLX's CPU build runs ahead with, so a large VAE pass does not peak at 3x its need.

On the CPU, MLX encodes a graph's kernels ahead of the thread that runs them and allocates each
output (and each convolution's patch matrix) at encoding time. A VAE block is one graph of dozens
of kernels on maps of 32-64 MB, so every buffer of the block is allocated before the first one is
freed: decoding a 256x256 image peaked at 1.05 GB over the weights, measured, for maps that need a
third of it. MLX throttles its encoder while the active memory is over ``mx.set_memory_limit``; a
limit of the memory in use now plus a headroom, held only for the pass, bounds the run-ahead.

A headroom too small serialises the CPU streams (128 MB: decode 34% slower); 512 MB kept the
speed and cut the decode's peak from 1046 to 583 MB over the weights (256x256, SD 1.5 VAE).
What keeps the streams fed grows with the feature maps: at 512x512 a flat 512 MB made the SD 1.5 decode
18.5 s against 13.3 s with 1 GB and 12.7 s unbounded (2 streams, fp32, 2-core EPYC; 640/768/896 MB:
17.6/16.7/15.7 s; one stream measured no difference), so VAE passes get ``MAPS_AHEAD`` of their largest
float32 feature map (``vae_headroom``; 1 GB at 512x512: decode peak 1146 instead of 877 MB over the
weights), at most ``MAX_VAE_HEADROOM`` (at 1024x1024, float16: 512 MB 80.0 s, 2 GB 69.6 s with the same
peak, 3316 MB over the weights, 4 GB 70.5 s and 4252 MB), and the low-memory preset keeps the flat bound.
UNet passes keep it too: a guided SD 1.5 pass at 512x512 took 8.7 s with 512 MB and 9.6 s with 1 GB.
Not used on Metal, where MLX's own limit and command buffers govern the run-ahead.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import mlx.core as mx

DEFAULT_HEADROOM = 512 * 2**20
MAPS_AHEAD = 4  # a VAE pass may run ahead by this many of its largest feature maps (in float32) ...
MAX_VAE_HEADROOM = 2 * 2**30  # ... up to this


def vae_headroom(largest_map_elements: int, floor: int = DEFAULT_HEADROOM) -> int:
    """The run-ahead bound of a VAE pass whose largest feature map (all samples) has this many elements:
    ``MAPS_AHEAD`` float32 maps, at most ``MAX_VAE_HEADROOM``, at least ``floor``."""
    return max(int(floor), min(MAX_VAE_HEADROOM, MAPS_AHEAD * 4 * int(largest_map_elements)))


@contextlib.contextmanager
def bounded_run_ahead(headroom: int | None) -> Iterator[None]:
    """While inside, MLX on the CPU allocates at most ``headroom`` bytes over what is in use on entry.

    ``None`` (or a GPU default device) leaves MLX's limit alone. The previous limit is restored on exit.
    """
    if headroom is None or mx.default_device() != mx.cpu:
        yield
        return
    previous = mx.set_memory_limit(mx.get_active_memory() + int(headroom))
    try:
        yield
    finally:
        mx.set_memory_limit(previous)
