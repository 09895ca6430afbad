"""Token merging for Stable Diffusion (ToMe for SD: Bolya & Hoffman 2023, arXiv 2303.17604;
github.com/dbolya/tomesd): fewer tokens through the transformer blocks' attention.

In each BasicTransformerBlock at a resolution with at most ``max_downsample`` downsampling (by default only
the highest, 4096 tokens at 512x512), the tokens are split into destinations (one per ``sy`` x ``sx`` cell of
the token grid: the top-left one, or a random one with ``use_rand``) and sources; the ``ratio`` * N sources
most similar (cosine, on the block's input) to some destination are averaged into it (bipartite soft
matching), the sub-layer runs on the merged tokens, and its output is copied back to every merged token
(unmerge). By default only self-attention (attn1) is merged, as tomesd recommends; ``merge_crossattn`` and
``merge_mlp`` are its other two options. ``ratio`` 0 merges nothing (exactly the plain path).

Randomness (``use_rand``): the destination picks come from numpy, keyed by (``seed``, the UNet evaluation of
the generation, the block's module name), so they are the same on MLX and torch, for every image of a batch and both
guidance halves however the batch is split (tomesd turns ``use_rand`` off for odd batches to keep the two
halves' picks equal), and the same each generation. This module holds the settings and the picks; the merge
itself is each backend's ``token_merge.py``. It imports no framework.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import numpy as np

from .validation import finite_float, non_negative_int, positive_int


@dataclass(frozen=True)
class TokenMergingConfig:
    """What ``enable_token_merging`` sets, with tomesd's ``apply_patch`` names and defaults (plus ``seed``)."""

    ratio: float = 0.5
    max_downsample: int = 1
    sx: int = 2
    sy: int = 2
    use_rand: bool = True
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        ratio = finite_float(self.ratio, "ratio")
        sx, sy = positive_int(self.sx, "sx"), positive_int(self.sy, "sy")
        if not 0.0 <= ratio <= 1.0 - 1.0 / (sx * sy):
            raise ValueError(f"ratio must be in [0, {1.0 - 1.0 / (sx * sy):g}] (1 - 1 / (sx * sy): at most every "
                             f"source token merged), got {self.ratio}")
        if self.max_downsample not in (1, 2, 4, 8):
            raise ValueError(f"max_downsample must be 1, 2, 4 or 8, got {self.max_downsample!r}")
        for name in ("use_rand", "merge_attn", "merge_crossattn", "merge_mlp"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        object.__setattr__(self, "ratio", ratio)
        object.__setattr__(self, "seed", non_negative_int(self.seed, "seed"))


def token_grid(latent_size: tuple[int, int], tokens: int, max_downsample: int) -> tuple[int, int] | None:
    """(h, w) of a block's token grid from the latent's size and its token count, as tomesd derives it
    (downsample = ceil(sqrt(latent tokens // tokens)); the UNet rounds odd sizes up); None where the block is
    more downsampled than ``max_downsample`` (or the count does not fit a grid)."""
    height, width = latent_size
    downsample = int(math.ceil(math.sqrt(height * width // tokens)))
    if downsample > max_downsample:
        return None
    h, w = -(-height // downsample), -(-width // downsample)
    return (h, w) if h * w == tokens else None


def destination_partition(h: int, w: int, sx: int, sy: int, picks: np.ndarray | None) -> tuple[np.ndarray, int]:
    """The token order [destinations..., sources...] (raster order within each) and the destination count.

    One destination per full ``sy`` x ``sx`` cell (``picks``: its index in the cell, (h // sy, w // sx), None:
    0, the top-left); tokens of the partial cells at the right and bottom edges are all sources, as tomesd."""
    hsy, wsx = h // sy, w // sx
    chosen = np.zeros((hsy, wsx), np.int64) if picks is None else np.asarray(picks, np.int64)
    is_dst = np.zeros((h, w), bool)
    rows = np.arange(hsy)[:, None] * sy + chosen // sx
    cols = np.arange(wsx)[None, :] * sx + chosen % sx
    is_dst[rows, cols] = True
    flat = is_dst.reshape(-1)
    order = np.concatenate([np.flatnonzero(flat), np.flatnonzero(~flat)])
    return order, hsy * wsx


class MergePair(NamedTuple):
    """A sub-layer's ``merge`` (tokens in) and ``unmerge`` (outputs back to every token)."""

    merge: Callable[[Any], Any]
    unmerge: Callable[[Any], Any]


def _same(x: Any) -> Any:
    return x


NO_MERGE_PAIR = MergePair(_same, _same)


class NoTokenMerge:
    """A block's default: every sub-layer sees all tokens."""

    def __call__(self, x: Any) -> tuple[MergePair, MergePair, MergePair]:
        return NO_MERGE_PAIR, NO_MERGE_PAIR, NO_MERGE_PAIR


NO_TOKEN_MERGE = NoTokenMerge()


class TokenMergeState:
    """Shared by the blocks of one UNet while token merging is on: the config, the latent size of the call in
    progress (set by the backend before each UNet call) and the UNet evaluation of the generation (for the
    random picks)."""

    def __init__(self, config: TokenMergingConfig) -> None:
        self.config = config
        self.latent_size: tuple[int, int] | None = None
        self.evaluation = 0

    def partition(self, h: int, w: int, block: int) -> tuple[np.ndarray, int]:
        c = self.config
        picks = None
        if c.use_rand:
            rng = np.random.default_rng((c.seed, self.evaluation, block))
            picks = rng.integers(0, c.sx * c.sy, size=(h // c.sy, w // c.sx))
        return destination_partition(h, w, c.sx, c.sy, picks)


class BlockTokenMerge:
    """One BasicTransformerBlock's ``token_merge``: its input tokens -> a MergePair for attn1, attn2 and ff.
    ``soft_matching(metric, order, num_dst, r)`` is the backend's bipartite soft matching."""

    def __init__(self, state: TokenMergeState, block: int, soft_matching: Callable[..., MergePair]) -> None:
        self.state, self.block, self.soft_matching = state, block, soft_matching

    def __call__(self, x: Any) -> tuple[MergePair, MergePair, MergePair]:
        c, size = self.state.config, self.state.latent_size
        tokens = int(x.shape[1])
        r = int(tokens * c.ratio)
        grid = token_grid(size, tokens, c.max_downsample) if size is not None and r > 0 else None
        if grid is None:
            return NO_TOKEN_MERGE(x)
        order, num_dst = self.state.partition(*grid, self.block)
        pair = self.soft_matching(x, order, num_dst, r)
        return (pair if c.merge_attn else NO_MERGE_PAIR, pair if c.merge_crossattn else NO_MERGE_PAIR,
                pair if c.merge_mlp else NO_MERGE_PAIR)


def attach_token_merging(named_modules: Any, block_class: type, config: TokenMergingConfig | None,
                         soft_matching: Callable[..., MergePair]) -> TokenMergeState | None:
    """Give every ``block_class`` module of ``named_modules`` ((name, module) pairs of a UNet) a BlockTokenMerge
    sharing one state, keyed by its name (the same on every backend), or (``config`` None) take them away.
    Returns the state (None when off)."""
    state = TokenMergeState(config) if config is not None else None
    for name, module in named_modules:
        if isinstance(module, block_class):
            module.token_merge = NO_TOKEN_MERGE if state is None else BlockTokenMerge(state, zlib.crc32(name.encode()),
                                                                                     soft_matching)
    return state
