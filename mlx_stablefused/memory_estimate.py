"""How much memory a generation needs, known before any work starts.

An absurd request (65536x65536) used to allocate for a minute and then crash (MLX) or fail in the
allocator (torch). The estimate here is a *lower bound* of the peak working memory beyond the loaded
weights, from the configs alone: the latents, the UNet's stored skip activations and its attention
scores, and the VAE decoder's top-resolution activations. A request is refused only when even that
bound exceeds the memory available, so nothing that would fit is turned away; the refusal says which
of the pipeline's options (VAE tiling, attention slicing, decoding one image at a time) bring the
bound under what is available. A hard cap on pixels (``MLX_STABLEFUSED_MAX_PIXELS``) stops the rest.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

from .env_settings import positive_from_env

MAX_PIXELS_ENV = "MLX_STABLEFUSED_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 8192 * 8192  # 64 MP: eight times an SDXL upscale to 4096x4096 with tiling
GiB = 1024 ** 3


@dataclass(frozen=True)
class Request:
    """The shape of one generation and the options that change its memory."""

    height: int
    width: int
    batch: int  # images (or videos) denoised together (the lower bound leaves out guidance's doubling)
    frames: int = 1
    attention_chunk: int | None = None  # query tokens per attention slice
    tile: int | None = None  # VAE tile size in pixels (None: the whole image)
    decode_batch: int | None = None  # images decoded at a time (None: all)


def max_pixels() -> int:
    """The hard cap on height x width (``MLX_STABLEFUSED_MAX_PIXELS``, else 64 MP)."""
    return positive_from_env(MAX_PIXELS_ENV, DEFAULT_MAX_PIXELS, int, "pixels")


def check_pixel_cap(height: int, width: int, names: tuple[str, str] = ("image_height", "image_width")) -> None:
    cap = max_pixels()
    if height * width > cap:
        raise ValueError(f"{names[0]} x {names[1]} = {height}x{width} is {height * width / 1e6:.0f} MP, over the "
                         f"cap of {cap / 1e6:.0f} MP (set {MAX_PIXELS_ENV} to raise it)")


def _heads(unet: Any, level: int) -> int:
    heads = getattr(unet, "num_attention_heads", None) or (8,)
    heads = heads if isinstance(heads, (tuple, list)) else (heads,) * len(unet.block_out_channels)
    return int(heads[min(level, len(heads) - 1)])


def estimate(unet: Any, vae: Any, request: Request, dtype_bytes: int, fused_attention: bool,
             score_cap: int | None = None) -> dict[str, int]:
    """Bytes per part of the peak (a lower bound): ``latents``, ``unet``, ``attention``, ``vae``.
    ``score_cap``: the most bytes of scores an attention slice holds whatever the request's slicing (MLX's
    CPU build always slices; see ``Backend.attention_slice_bytes``)."""
    def capped(scores: int) -> int:
        return min(scores, score_cap) if score_cap else scores

    f = 2 ** (len(vae.block_out_channels) - 1)
    h, w = request.height // f, request.width // f
    images = request.batch * request.frames
    unet_batch = images
    latents = 3 * images * unet.in_channels * h * w * 4  # noise, latents and the sampler's float32 copy
    # Skip connections kept from the down path until the up path: every resnet/downsample output, per level.
    skips = 0
    for level, channels in enumerate(unet.block_out_channels):
        layers = unet.layers_per_block[level] if isinstance(unet.layers_per_block, (tuple, list)) else \
            unet.layers_per_block
        skips += (layers + 1) * channels * (h * w // 4 ** level)
    unet_bytes = unet_batch * (skips + 2 * unet.block_out_channels[0] * h * w) * dtype_bytes
    attention = 0
    if not fused_attention:
        for level, kind in enumerate(unet.down_block_types):
            if "CrossAttn" in kind:
                tokens = h * w // 4 ** level
                queries = min(tokens, request.attention_chunk or tokens)
                attention = max(attention, capped(unet_batch * _heads(unet, level) * queries * tokens * dtype_bytes))
    tile_h, tile_w = (min(request.tile, request.height), min(request.tile, request.width)) if request.tile else \
        (request.height, request.width)
    decoded_together = min(images, request.decode_batch or images)
    vae_bytes = 2 * decoded_together * vae.block_out_channels[0] * tile_h * tile_w * dtype_bytes
    if not fused_attention and getattr(vae, "mid_block_add_attention", True):
        tokens = (tile_h // f) * (tile_w // f)
        vae_bytes += capped(decoded_together * tokens * tokens * dtype_bytes)
    vae_bytes += images * request.height * request.width * 3 * 4  # the decoded float32 images
    return {"latents": latents, "unet": unet_bytes, "attention": attention, "vae": vae_bytes}


def peak(parts: dict[str, int]) -> int:
    """The UNet and the VAE decoder do not run at once; the latents live throughout."""
    return parts["latents"] + max(parts["unet"] + parts["attention"], parts["vae"])


def system_available_memory() -> int | None:
    """Free RAM (Linux: MemAvailable; elsewhere the physical size), or None when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _gb(n: float) -> str:
    return f"{n / GiB:.1f} GB" if n < 1024 * GiB else f"{n / 1024 ** 4:,.0f} TB"


# The pipeline options that lower the peak, as the changes they make to a request.
OPTIONS = {
    "enable_tiling()": lambda r: {"tile": min(512, r.height, r.width)},
    "enable_attention_slicing()": lambda r: {"attention_chunk": 1024},
    "enable_slicing() (decode one image at a time)": lambda r: {"decode_batch": 1},
}


def _option_sets() -> list[tuple[str, ...]]:
    """Every combination of OPTIONS, fewest first: the advice names the smallest one that fits."""
    from itertools import combinations

    names = list(OPTIONS)
    return [combo for k in range(1, len(names) + 1) for combo in combinations(names, k)]


def check_fits(unet: Any, vae: Any, request: Request, dtype_bytes: int, fused_attention: bool,
               available: int | None, what: str = "this request", score_cap: int | None = None) -> dict[str, int]:
    """Refuse (MemoryError) a request whose lower-bound peak exceeds ``available``; returns the parts.
    Its advice names only options that change the bound (with ``score_cap``, attention slicing may not)."""
    parts = estimate(unet, vae, request, dtype_bytes, fused_attention, score_cap)
    need = peak(parts)
    if available is None or need <= available:
        return parts
    advice = "no option makes it fit: use a smaller size, batch or frame count"
    for names in _option_sets():
        changed = request
        for name in names:
            changed = replace(changed, **OPTIONS[name](request))
        if peak(estimate(unet, vae, changed, dtype_bytes, fused_attention, score_cap)) <= available:
            advice = f"it would fit with {' + '.join(names)}"
            break
    largest = max(("UNet activations", parts["unet"]), ("attention scores", parts["attention"]),
                  ("VAE decoder activations", parts["vae"]), key=lambda item: item[1])
    raise MemoryError(f"{what} needs at least {_gb(need)} of working memory (largest part: {largest[0]}, "
                      f"{_gb(largest[1])}) but {_gb(available)} is available; {advice}")
