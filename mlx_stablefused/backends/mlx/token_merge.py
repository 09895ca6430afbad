"""ToMe's bipartite soft matching in MLX (see mlx_stablefused.token_merging): merge by averaging, unmerge by
one gather (every token reads the merged token it went into)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ...token_merging import MergePair


def bipartite_soft_matching(metric: mx.array, order: np.ndarray, num_dst: int, r: int) -> MergePair:
    """``metric`` (B, N, C): the block's input tokens; ``order`` [destinations..., sources...] (N,); merge the
    ``r`` sources most similar to a destination into it (each source into its most similar destination)."""
    b, n, _ = metric.shape
    dst_idx, src_idx = mx.array(order[:num_dst]), mx.array(order[num_dst:])
    r = min(r, n - num_dst)
    unit = metric.astype(mx.float32)
    unit = unit / mx.linalg.norm(unit, axis=-1, keepdims=True)
    scores = mx.take(unit, src_idx, axis=1) @ mx.take(unit, dst_idx, axis=1).transpose(0, 2, 1)
    best = mx.argmax(scores, axis=-1)  # each source's most similar destination
    ranked = mx.argsort(-mx.max(scores, axis=-1), axis=-1)  # sources, most similar first
    merged, kept = ranked[:, :r], ranked[:, r:]
    into = mx.take_along_axis(best, merged, axis=1)  # (B, r): the destination each merged source joins
    kept_count = n - num_dst - r
    rows = mx.arange(b)[:, None]

    def merge(x: mx.array) -> mx.array:
        src, dst = mx.take(x, src_idx, axis=1), mx.take(x, dst_idx, axis=1)
        sums = dst.at[rows, into].add(mx.take_along_axis(src, merged[..., None], axis=1))
        counts = mx.ones((b, num_dst), x.dtype).at[rows, into].add(mx.ones((b, r), x.dtype))
        return mx.concatenate([mx.take_along_axis(src, kept[..., None], axis=1), sums / counts[..., None]], axis=1)

    # Token p of the input reads merged token source[p]: kept sources first, then the destinations.
    positions = mx.concatenate([mx.take(src_idx, kept), mx.take(src_idx, merged),
                                mx.broadcast_to(dst_idx, (b, num_dst))], axis=1)
    reads = mx.concatenate([mx.broadcast_to(mx.arange(kept_count), (b, kept_count)), kept_count + into,
                            mx.broadcast_to(kept_count + mx.arange(num_dst), (b, num_dst))], axis=1)
    source = mx.take_along_axis(reads, mx.argsort(positions, axis=1), axis=1)

    def unmerge(x: mx.array) -> mx.array:
        return mx.take_along_axis(x, source[..., None], axis=1)

    return MergePair(merge, unmerge)
