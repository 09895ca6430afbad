"""ToMe's bipartite soft matching in PyTorch (see mlx_stablefused.token_merging): merge by averaging, unmerge
by one gather (every token reads the merged token it went into)."""

from __future__ import annotations

import numpy as np
import torch

from ...token_merging import MergePair


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x`` (B, N, C) at token indices ``index`` (B, M) -> (B, M, C)."""
    return torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))


@torch.no_grad()
def bipartite_soft_matching(metric: torch.Tensor, order: np.ndarray, num_dst: int, r: int) -> MergePair:
    """``metric`` (B, N, C): the block's input tokens; ``order`` [destinations..., sources...] (N,); merge the
    ``r`` sources most similar to a destination into it (each source into its most similar destination)."""
    b, n, _ = metric.shape
    device = metric.device
    dst_idx = torch.as_tensor(order[:num_dst], device=device)
    src_idx = torch.as_tensor(order[num_dst:], device=device)
    r = min(r, n - num_dst)
    unit = metric.float()
    unit = unit / unit.norm(dim=-1, keepdim=True)
    scores = unit[:, src_idx] @ unit[:, dst_idx].transpose(1, 2)
    best_score, best = scores.max(dim=-1)  # each source's most similar destination
    ranked = best_score.argsort(dim=-1, descending=True)  # sources, most similar first
    merged, kept = ranked[:, :r], ranked[:, r:]
    into = torch.gather(best, 1, merged)  # (B, r): the destination each merged source joins
    kept_count = n - num_dst - r

    def merge(x: torch.Tensor) -> torch.Tensor:
        src, dst = x[:, src_idx], x[:, dst_idx]
        sums = dst.scatter_add(1, into[..., None].expand(-1, -1, x.shape[-1]), _rows(src, merged))
        counts = torch.ones(b, num_dst, dtype=x.dtype, device=device).scatter_add(
            1, into, torch.ones(b, r, dtype=x.dtype, device=device))
        return torch.cat([_rows(src, kept), sums / counts[..., None]], dim=1)

    # Token p of the input reads merged token source[p]: kept sources first, then the destinations.
    positions = torch.cat([src_idx[kept], src_idx[merged], dst_idx.expand(b, num_dst)], dim=1)
    reads = torch.cat([torch.arange(kept_count, device=device).expand(b, kept_count), kept_count + into,
                       (kept_count + torch.arange(num_dst, device=device)).expand(b, num_dst)], dim=1)
    source = torch.gather(reads, 1, positions.argsort(dim=1))

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        return _rows(x, source)

    return MergePair(merge, unmerge)
