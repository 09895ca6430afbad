"""Building blocks shared by the MLX UNet and VAE, named as diffusers names them.

Attribute names mirror diffusers (``to_q``, ``to_out.0``, ``ff.net.0.proj``, ``norm1``,
``conv_shortcut`` ...) so that checkpoint keys map onto parameters one to one; only the
array layout changes (MLX convolutions are channels-last). Tensors are NHWC.
"""

from __future__ import annotations

import contextlib
import math

import mlx.core as mx
import mlx.nn as nn

from ...topology import ResnetPlan
from . import cpu_math
from .cpu_math import attention, channel_sums, gelu, silu


PIECE_BYTES = 16 * 2**20  # a GroupNorm input larger than this in float32 is normalised in row pieces of it


def row_pieces(x: mx.array) -> list[mx.array]:
    """``x`` split along axis 1 (image rows; tokens for (B, N, C)) into pieces of at most ``PIECE_BYTES`` as
    float32 (the whole ``x`` when it fits: the one-piece path is the unsplit computation)."""
    rows = x.shape[1]
    per_row = 4 * x.size // max(rows, 1)
    step = max(1, PIECE_BYTES // max(per_row, 1))
    return [x] if step >= rows else [x[:, s:s + step] for s in range(0, rows, step)]


class GroupNorm(nn.Module):
    """GroupNorm over the last axis with torch's grouping of adjacent channels.

    Two-pass statistics (mean, then mean of squared deviations), taken per channel and then summed
    per group, in float32 whatever the input dtype. On the CPU the per-channel sums are BLAS
    products with a ones vector: MLX's strided reductions over (pixels, channels-in-group) took 140 ms
    on a 256x256x128 map, the products 30 ms for the whole norm, and BLAS's blocked sums land 20x
    closer to a float64 reference (max abs 1.8e-6 vs 3.3e-5; torch's own: 6.2e-5).

    Inputs over ``PIECE_BYTES`` in float32 are normalised in row pieces (sums added over the pieces, as over
    bands): the float32 copy, deviations and output of a whole map were live at once, six times a float16
    map: 3 GiB for the 256-channel 1024x1024 maps of SDXL's VAE decode, which held its peak.
    """

    def __init__(self, groups: int, channels: int, eps: float) -> None:
        super().__init__()
        self.weight = mx.ones((channels,))
        self.bias = mx.zeros((channels,))
        self._groups, self._eps = groups, eps

    def __call__(self, x: mx.array) -> mx.array:
        pieces = row_pieces(x)
        if len(pieces) > 1:
            return mx.concatenate(self._normalise(pieces, [None] * len(pieces), recompute=True), axis=1)
        y = self._as_rows(x)
        count = y.shape[1] * (y.shape[2] // self._groups)
        d = y - self._per_group(channel_sums(y)) / count
        scale = self._scale(self._per_group(channel_sums(d * d)) / count)
        return self._finish(d, scale, x)

    def over_bands(self, bands: list[mx.array], streams: list[mx.Stream], silu: bool = False) -> list[mx.array]:
        """The same normalisation of an image held as row bands, each band's work on its own stream.

        Per-channel sums are added over all bands (two passes, as above); only the order of the
        float32 additions differs from the whole-image call. ``silu`` fuses the activation that
        follows every GroupNorm in a resnet. Large bands are normalised in row pieces (``row_pieces``).
        """
        pieces = [row_pieces(band) for band in bands]
        outs = iter(self._normalise([p for band in pieces for p in band],
                                    [s for band, s in zip(pieces, streams) for _ in band], silu,
                                    recompute=any(len(band) > 1 for band in pieces)))
        return [next(outs) if len(band) == 1 else mx.concatenate([next(outs) for _ in band], axis=1)
                for band in pieces]

    def _normalise(self, bands: list[mx.array], streams: list[mx.Stream | None], silu: bool = False,
                   recompute: bool = False) -> list[mx.array]:
        """The bands (or pieces) of one map, each normalised by the statistics of them all. ``recompute``: each
        pass re-derives its piece's float32 rows and deviations from the input (the same values) instead of
        holding every piece's until the last pass, so only a few pieces' float32 work is live at a time."""
        held = None if recompute else on_bands(self._as_rows, streams, bands)
        count = sum(math.prod(b.shape[1:-1]) for b in bands) * (bands[0].shape[-1] // self._groups)
        indices = list(range(len(bands)))

        def float_rows(i: int) -> mx.array:
            return self._as_rows(bands[i]) if held is None else held[i]

        mean = self._per_group(sum(on_bands(lambda i: channel_sums(float_rows(i)), streams, indices))) / count
        ds = None if recompute else on_bands(lambda i: float_rows(i) - mean, streams, indices)

        def deviation(i: int) -> mx.array:
            return float_rows(i) - mean if ds is None else ds[i]

        def squares(i: int) -> mx.array:
            d = deviation(i)
            return channel_sums(d * d)

        scale = self._scale(self._per_group(sum(on_bands(squares, streams, indices))) / count)

        def finish(i: int) -> mx.array:
            out = self._finish(deviation(i), scale, bands[i])
            return cpu_math.silu(out) if silu else out

        return on_bands(finish, streams, indices)

    @staticmethod
    def _as_rows(x: mx.array) -> mx.array:
        """(B, ..., C) -> (B, N, C) in float32."""
        y = x.reshape(x.shape[0], -1, x.shape[-1])
        return y if y.dtype == mx.float32 else y.astype(mx.float32)

    def _per_group(self, sums: mx.array) -> mx.array:
        """(B, 1, C) per-channel sums -> each channel's group total, (B, 1, C)."""
        b, _, c = sums.shape
        g = self._groups
        totals = sums.reshape(b, 1, g, c // g).sum(axis=-1, keepdims=True)
        return mx.broadcast_to(totals, (b, 1, g, c // g)).reshape(b, 1, c)

    def _scale(self, var: mx.array) -> mx.array:
        return mx.rsqrt(var + self._eps) * self.weight

    def _finish(self, d: mx.array, scale: mx.array, like: mx.array) -> mx.array:
        out = d * scale + self.bias
        return (out if like.dtype == mx.float32 else out.astype(like.dtype)).reshape(like.shape)


def on_bands(fn, streams: list[mx.Stream | None], *band_lists: list[mx.array]) -> list[mx.array]:
    """``fn`` applied band by band, each band's graph built on its own stream (so it runs on its own core;
    None: the current stream)."""
    out = []
    for stream, args in zip(streams, zip(*band_lists)):
        with mx.stream(stream) if stream is not None else contextlib.nullcontext():
            out.append(fn(*args))
    return out


def group_norm(groups: int, channels: int, eps: float) -> GroupNorm:
    return GroupNorm(groups, channels, eps)


def resize_nearest(x: mx.array, size: tuple[int, int]) -> mx.array:
    """Nearest-neighbour resize of NHWC ``x`` to ``size`` with torch's 'nearest' index rule."""
    b, h, w, c = x.shape
    oh, ow = size
    if (oh, ow) == (2 * h, 2 * w):
        x = mx.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
        return x.reshape(b, oh, ow, c)
    rows = mx.array([min(int(i * h / oh), h - 1) for i in range(oh)])
    cols = mx.array([min(int(j * w / ow), w - 1) for j in range(ow)])
    return mx.take(mx.take(x, rows, axis=1), cols, axis=2)


def timestep_embedding(timesteps: mx.array, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> mx.array:
    """Sinusoidal embedding of (fractional) training timesteps, in float32 as diffusers computes it."""
    half = dim // 2
    exponent = -math.log(10000.0) * mx.arange(half, dtype=mx.float32) / (half - freq_shift)
    args = timesteps.astype(mx.float32)[:, None] * mx.exp(exponent)[None, :]
    sin, cos = mx.sin(args), mx.cos(args)
    emb = mx.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = mx.pad(emb, [(0, 0), (0, 1)])
    return emb


class Attention(nn.Module):
    """Multi-head attention with diffusers' parameter names; fused SDPA kernel."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, cross_attention_dim: int | None = None,
                 bias: bool = False, out_bias: bool = True, upcast: bool = False) -> None:
        super().__init__()
        inner = heads * dim_head
        kv_dim = cross_attention_dim or query_dim
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(kv_dim, inner, bias=bias)
        self.to_v = nn.Linear(kv_dim, inner, bias=bias)
        self.to_out = [nn.Linear(inner, query_dim, bias=out_bias)]
        self._heads = heads
        self._dim_head = dim_head
        self._upcast = upcast
        self._query_chunk: int | None = None

    def set_query_chunk(self, chunk: int | None) -> None:
        """Attend in slices of ``chunk`` queries so the score matrix never exists whole."""
        self._query_chunk = chunk

    def __call__(self, x: mx.array, context: mx.array | tuple[mx.array, mx.array] | None = None) -> mx.array:
        """``context`` may be (text, IP-Adapter image tokens): then the ``ip_adapter`` layers attached here
        (backends/mlx/ip_adapter.py) add their scaled attention over the image tokens."""
        context, image = context if isinstance(context, tuple) else (context, None)
        context = x if context is None else context
        b, lq, _ = x.shape
        lk = context.shape[1]
        h, d = self._heads, self._dim_head
        q = self.to_q(x).reshape(b, lq, h, d).transpose(0, 2, 1, 3)
        k = self.to_k(context).reshape(b, lk, h, d).transpose(0, 2, 1, 3)
        v = self.to_v(context).reshape(b, lk, h, d).transpose(0, 2, 1, 3)
        dtype = q.dtype
        if self._upcast and dtype != mx.float32:
            q, k, v = q.astype(mx.float32), k.astype(mx.float32), v.astype(mx.float32)
        scale = d**-0.5
        o = attention(q, k, v, scale, self._query_chunk)
        if image is not None and self.ip_adapter.scale != 0:  # scale 0: exactly the text attention, as diffusers
            o = o + self.ip_adapter.attend(q, image, scale, self._query_chunk)
        o = o.astype(dtype).transpose(0, 2, 1, 3).reshape(b, lq, h * d)
        return self.to_out[0](o)


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def __call__(self, x: mx.array) -> mx.array:
        value, gate = mx.split(self.proj(x), 2, axis=-1)  # value first, gate second
        return value * gelu(gate)  # exact (erf) GELU, as diffusers


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        inner = dim * mult
        # net.1 is diffusers' Dropout: kept so that net.2 keeps its checkpoint index.
        self.net = [GEGLU(dim, inner), nn.Identity(), nn.Linear(inner, dim)]

    def __call__(self, x: mx.array) -> mx.array:
        return self.net[2](self.net[0](x))


class ResnetBlock2D(nn.Module):
    def __init__(self, plan: ResnetPlan) -> None:
        super().__init__()
        in_channels, out_channels, temb_channels = plan.in_channels, plan.out_channels, plan.temb_channels
        groups, eps = plan.groups, plan.eps
        self.norm1 = group_norm(groups, in_channels, eps)
        self.conv1 = StripConv2d(in_channels, out_channels, 3, padding=1)
        if temb_channels is not None:
            self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = group_norm(groups, out_channels, eps)
        self.conv2 = StripConv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.conv_shortcut = nn.Linear(in_channels, out_channels)  # a 1x1 convolution

    def __call__(self, x: mx.array, temb: mx.array | None = None) -> mx.array:
        h = self.conv1(silu(self.norm1(x)))
        if temb is not None:
            h = h + self.time_emb_proj(silu(temb))[:, None, None, :]
        h = self.conv2(silu(self.norm2(h)))
        if "conv_shortcut" in self:
            x = self.conv_shortcut(x)
        return x + h

    def over_bands(self, bands: list[mx.array], streams: list[mx.Stream]) -> list[mx.array]:
        """The block on an image held as row bands (VAE resnets: no time embedding)."""
        h = self.conv1.over_bands(self.norm1.over_bands(bands, streams, silu=True), streams)
        h = self.conv2.over_bands(self.norm2.over_bands(h, streams, silu=True), streams)
        shortcut = self.conv_shortcut if "conv_shortcut" in self else (lambda x: x)
        return on_bands(lambda x, y: shortcut(x) + y, streams, bands, h)


class StripConv2d(nn.Conv2d):
    """A 3x3, stride-1 convolution that runs on horizontal strips when the image is large.

    MLX's CPU convolution materialises a 9x-channel patch matrix; on a 512x512, 256-channel VAE map
    that is 2.4 GB. Strips of ``rows`` output rows (with a one-row halo) bound it; the result is
    identical, each strip being an ordinary convolution of its own rows.
    """

    max_patch_bytes = 64 * 2**20

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        patch_bytes = b * h * w * c * 9 * x.itemsize
        if patch_bytes <= self.max_patch_bytes or h < 8:
            return super().__call__(x)
        return self._rows_padded(mx.pad(x, [(0, 0), (1, 1), (0, 0), (0, 0)]))

    def _rows_padded(self, xp: mx.array) -> mx.array:
        """Convolve an input whose rows are already padded (columns are padded by the conv)."""
        b, h, w, c = xp.shape[0], xp.shape[1] - 2, xp.shape[2], xp.shape[3]
        patch_bytes = b * h * w * c * 9 * xp.itemsize
        rows = h if patch_bytes <= self.max_patch_bytes else max(1, int(h * self.max_patch_bytes / patch_bytes))
        strips = []
        for s in range(0, h, rows):
            e = min(h, s + rows)
            y = mx.conv2d(xp[:, s:e + 2], self.weight, padding=(0, 1))
            strips.append(y + self.bias if "bias" in self else y)
        return strips[0] if len(strips) == 1 else mx.concatenate(strips, axis=1)

    def over_bands(self, bands: list[mx.array], streams: list[mx.Stream]) -> list[mx.array]:
        """The convolution of an image held as row bands: each band borrows one row from each neighbour."""
        last = len(bands) - 1

        def padded(i: int) -> mx.array:
            band = bands[i]
            top = bands[i - 1][:, -1:] if i > 0 else mx.zeros_like(band[:, :1])
            bottom = bands[i + 1][:, :1] if i < last else mx.zeros_like(band[:, :1])
            return self._rows_padded(mx.concatenate([top, band, bottom], axis=1))

        return on_bands(padded, streams, list(range(len(bands))))


class Downsample2D(nn.Module):
    def __init__(self, channels: int, padding: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)
        self._asymmetric_pad = padding == 0  # VAE style: pad right and bottom only

    def __call__(self, x: mx.array) -> mx.array:
        if self._asymmetric_pad:
            x = mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)])
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = StripConv2d(channels, channels, 3, padding=1)

    def __call__(self, x: mx.array, size: tuple[int, int] | None = None) -> mx.array:
        size = size or (2 * x.shape[1], 2 * x.shape[2])
        return self.conv(resize_nearest(x, size))

    def over_bands(self, bands: list[mx.array], streams: list[mx.Stream]) -> list[mx.array]:
        """2x nearest upsampling is row-local: each band doubles on its own stream."""
        up = on_bands(lambda x: resize_nearest(x, (2 * x.shape[1], 2 * x.shape[2])), streams, bands)
        return self.conv.over_bands(up, streams)
