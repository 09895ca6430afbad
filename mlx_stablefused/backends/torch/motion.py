"""Temporal layers in PyTorch: attention and convolution across frames (as backends/mlx/motion.py; NCHW,
frames in the batch)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ...topology import TemporalPlan
from .layers import Attention, FeedForward, group_norm


def sinusoidal_table(length: int, dim: int, device: torch.device) -> torch.Tensor:
    position = torch.arange(length, dtype=torch.float32, device=device)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device) * (-math.log(10000.0) / dim))
    angles = position * div[None, :]
    return torch.stack([torch.sin(angles), torch.cos(angles)], dim=-1).reshape(length, -1)[:, :dim]


class TemporalTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.attn2 = Attention(dim, heads, head_dim)
        self.norm3 = nn.LayerNorm(dim, eps=1e-5)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn1(h if positions is None else h + positions)
        h = self.norm2(x)
        x = x + self.attn2(h if positions is None else h + positions)
        return x + self.ff(self.norm3(x))


class TemporalTransformer(nn.Module):
    """Attention across frames per pixel: AnimateDiff's motion module (sinusoidal positions, a maximum
    length) or ModelScope's TransformerTemporalModel (no positions)."""

    def __init__(self, plan: TemporalPlan) -> None:
        super().__init__()
        channels, heads, head_dim, max_seq_length = plan.channels, plan.heads, plan.head_dim, plan.max_seq_length
        inner = heads * head_dim
        self.norm = group_norm(plan.groups, channels, 1e-6)
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList([TemporalTransformerBlock(inner, heads, head_dim)
                                                 for _ in range(plan.layers)])
        self.proj_out = nn.Linear(inner, channels)
        self.max_seq_length = max_seq_length
        self.per_frame_norm = False

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        bf, c, h, w = x.shape
        f = num_frames
        b = bf // f
        if self.max_seq_length is not None and f > self.max_seq_length:
            raise ValueError(f"{f} frames exceed this motion module's maximum of {self.max_seq_length}; "
                             "generate fewer frames or use context windows (context_length=...)")
        if self.per_frame_norm:
            y = self.norm(x)
        else:  # statistics across all frames of a video: (B, C, F*H, W)
            y = self.norm(x.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4).reshape(b, c, f * h, w))
            y = y.reshape(b, c, f, h, w).permute(0, 2, 1, 3, 4).reshape(bf, c, h, w)
        # one sequence of F frames per pixel: (B*H*W, F, C)
        y = y.reshape(b, f, c, h * w).permute(0, 3, 1, 2).reshape(b * h * w, f, c)
        y = self.proj_in(y)
        positions = None
        if self.max_seq_length is not None:
            positions = sinusoidal_table(f, y.shape[-1], y.device).to(y.dtype)[None]
        for block in self.transformer_blocks:
            y = block(y, positions)
        y = self.proj_out(y)
        y = y.reshape(b, h * w, f, c).permute(0, 2, 3, 1).reshape(bf, c, h, w)
        return x + y


def AnimateDiffTransformer3D(channels: int, heads: int, num_layers: int, groups: int,  # noqa: N802
                             max_seq_length: int) -> TemporalTransformer:
    """An AnimateDiff motion module: ``heads`` heads over the full width, sinusoidal positions."""
    return TemporalTransformer(TemporalPlan(channels, heads, channels // heads, num_layers, groups,
                                            max_seq_length))


def _stage(channels: int, groups: int, dropout: bool) -> nn.Sequential:
    layers = [group_norm(groups, channels, 1e-5), nn.SiLU()] + ([nn.Identity()] if dropout else [])
    return nn.Sequential(*layers, nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0)))


class TemporalConvLayer(nn.Module):
    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.conv1 = _stage(channels, groups, False)
        self.conv2 = _stage(channels, groups, True)
        self.conv3 = _stage(channels, groups, True)
        self.conv4 = _stage(channels, groups, True)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        bf, c, h, w = x.shape
        y = x.reshape(bf // num_frames, num_frames, c, h, w).permute(0, 2, 1, 3, 4)
        y = self.conv4(self.conv3(self.conv2(self.conv1(y))))
        return x + y.permute(0, 2, 1, 3, 4).reshape(bf, c, h, w)
