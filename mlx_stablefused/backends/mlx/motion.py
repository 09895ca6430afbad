"""Temporal layers in MLX: attention (AnimateDiff's motion modules, ModelScope's temporal transformers)
and convolution (ModelScope's) across the frames of each pixel.

A motion module is a residual block inserted after each spatial layer of the SD UNet. Frames
live in the batch axis, (B*F, H, W, C), frame-minor; the module regroups them as one
sequence of F tokens per pixel. GroupNorm statistics span all frames, as in diffusers
(``per_frame_norm=True`` reproduces the original AnimateDiff repo, which normalised each frame).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from ...topology import TemporalPlan
from .cpu_math import silu
from .layers import Attention, FeedForward, group_norm


def sinusoidal_table(length: int, dim: int) -> mx.array:
    """Interleaved sin/cos positions (sin at even channels), as AnimateDiff and diffusers compute them."""
    position = mx.arange(length, dtype=mx.float32)[:, None]
    div = mx.exp(mx.arange(0, dim, 2, dtype=mx.float32) * (-math.log(10000.0) / dim))
    angles = position * div[None, :]
    return mx.stack([mx.sin(angles), mx.cos(angles)], axis=-1).reshape(length, -1)[:, :dim]


class TemporalTransformerBlock(nn.Module):
    """Two temporal self-attentions (positions, if any, added to their inputs) and a GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.attn2 = Attention(dim, heads, head_dim)
        self.norm3 = nn.LayerNorm(dim, eps=1e-5)
        self.ff = FeedForward(dim)

    def __call__(self, x: mx.array, positions: mx.array | None) -> mx.array:
        h = self.norm1(x)
        x = x + self.attn1(h if positions is None else h + positions)
        h = self.norm2(x)
        x = x + self.attn2(h if positions is None else h + positions)
        return x + self.ff(self.norm3(x))


class TemporalTransformer(nn.Module):
    """Attention across frames, per pixel: AnimateDiff's motion module (with sinusoidal positions and a
    maximum length) and ModelScope's TransformerTemporalModel (without positions)."""

    def __init__(self, plan: TemporalPlan) -> None:
        super().__init__()
        channels, heads, head_dim, max_seq_length = plan.channels, plan.heads, plan.head_dim, plan.max_seq_length
        inner = heads * head_dim
        self.norm = group_norm(plan.groups, channels, 1e-6)
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = [TemporalTransformerBlock(inner, heads, head_dim) for _ in range(plan.layers)]
        self.proj_out = nn.Linear(inner, channels)
        self._max_seq_length = max_seq_length
        self.per_frame_norm = False

    def __call__(self, x: mx.array, num_frames: int) -> mx.array:
        bf, h, w, c = x.shape
        f = num_frames
        b = bf // f
        if self._max_seq_length is not None and f > self._max_seq_length:
            raise ValueError(f"{f} frames exceed this motion module's maximum of {self._max_seq_length}; "
                             "generate fewer frames or use context windows (context_length=...)")
        y = self.norm(x.reshape(bf if self.per_frame_norm else b, -1, c))
        # (B, F, HW, C) -> one sequence of F frames per pixel: (B*HW, F, C)
        y = y.reshape(b, f, h * w, c).transpose(0, 2, 1, 3).reshape(b * h * w, f, c)
        y = self.proj_in(y)
        positions = None
        if self._max_seq_length is not None:
            positions = sinusoidal_table(f, y.shape[-1]).astype(y.dtype)[None]
        for block in self.transformer_blocks:
            y = block(y, positions)
        y = self.proj_out(y)
        y = y.reshape(b, h * w, f, c).transpose(0, 2, 1, 3).reshape(bf, h, w, c)
        return x + y


def AnimateDiffTransformer3D(channels: int, heads: int, num_layers: int, groups: int,  # noqa: N802
                             max_seq_length: int) -> TemporalTransformer:
    """An AnimateDiff motion module: ``heads`` heads over the full width, sinusoidal positions."""
    return TemporalTransformer(TemporalPlan(channels, heads, channels // heads, num_layers, groups,
                                            max_seq_length))


class TemporalConvLayer(nn.Module):
    """Four (GroupNorm, SiLU, 3-tap convolution over frames) stages and a residual; diffusers' key layout:
    conv1 = [norm, act, conv], conv2..4 = [norm, act, dropout, conv]."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.conv1 = [group_norm(groups, channels, 1e-5), nn.SiLU(), nn.Conv1d(channels, channels, 3, padding=1)]
        self.conv2 = [group_norm(groups, channels, 1e-5), nn.SiLU(), nn.Identity(),
                      nn.Conv1d(channels, channels, 3, padding=1)]
        self.conv3 = [group_norm(groups, channels, 1e-5), nn.SiLU(), nn.Identity(),
                      nn.Conv1d(channels, channels, 3, padding=1)]
        self.conv4 = [group_norm(groups, channels, 1e-5), nn.SiLU(), nn.Identity(),
                      nn.Conv1d(channels, channels, 3, padding=1)]

    def __call__(self, x: mx.array, num_frames: int) -> mx.array:
        bf, h, w, c = x.shape
        f = num_frames
        b = bf // f
        y = x.reshape(b, f, h * w, c)
        for stage in (self.conv1, self.conv2, self.conv3, self.conv4):
            norm, conv = stage[0], stage[-1]
            y = silu(norm(y.reshape(b, f * h * w, c)))  # statistics across frames, as on (B, C, F, H, W)
            # a convolution over frames for every pixel: (B*HW, F, C)
            y = y.reshape(b, f, h * w, c).transpose(0, 2, 1, 3).reshape(b * h * w, f, c)
            y = conv(y).reshape(b, h * w, f, c).transpose(0, 2, 1, 3)
        return x + y.reshape(bf, h, w, c)
