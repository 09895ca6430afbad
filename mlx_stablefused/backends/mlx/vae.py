"""AutoencoderKL in MLX, built from its topology plan (mlx_stablefused.topology). Tensors are NHWC."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ...config import VAEConfig
from ...topology import VAE_EPS, CoderPlan, VAEBlockPlan, VAEMidBlockPlan, vae_plan
from .cpu_math import attention, silu
from .cpu_streams import StreamSet, split_axis
from .layers import Downsample2D, ResnetBlock2D, StripConv2d, Upsample2D, group_norm


SCORE_SLICE_BYTES = 128 * 2**20  # the VAE attention's automatic query slices keep a float32 score slice under this


def automatic_query_chunk(batch: int, tokens: int, budget: int | None = None) -> int | None:
    """Queries per slice so that one slice's (batch, chunk, tokens) float32 scores fit ``budget``; None when
    the whole matrix does. The VAE's one head attends over every pixel, so its scores grow with the square
    of the image area: at 1024x1024 (SDXL's size) 16384 x 16384 floats, 1 GiB, and as much again for the
    softmax weights, which held the decode's peak; in slices each query's softmax is its own (exact)."""
    chunk = max(1, (SCORE_SLICE_BYTES if budget is None else budget) // (4 * batch * tokens))
    return None if chunk >= tokens else chunk


class SpatialSelfAttention(nn.Module):
    """The VAE mid-block attention: one head over all pixels, with its own GroupNorm and residual. Attends in
    query slices of ``automatic_query_chunk`` at large sizes (or the caller's smaller ``set_query_chunk``)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.group_norm = group_norm(groups, channels, VAE_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = [nn.Linear(channels, channels)]
        self._query_chunk: int | None = None

    def set_query_chunk(self, chunk: int | None) -> None:
        self._query_chunk = chunk

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        y = self.group_norm(x).reshape(b, 1, h * w, c)
        q, k, v = self.to_q(y), self.to_k(y), self.to_v(y)
        scale = c**-0.5
        chunks = [n for n in (self._query_chunk, automatic_query_chunk(b, h * w)) if n]
        o = attention(q, k, v, scale, min(chunks) if chunks else None)
        return x + self.to_out[0](o).reshape(b, h, w, c)


class UNetMidBlock2D(nn.Module):
    def __init__(self, plan: VAEMidBlockPlan) -> None:
        super().__init__()
        self.resnets = [ResnetBlock2D(r) for r in plan.resnets]
        if plan.attention:
            self.attentions = [SpatialSelfAttention(plan.channels, plan.groups)]

    def __call__(self, x: mx.array) -> mx.array:
        x = self.resnets[0](x)
        if "attentions" in self:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class EncoderBlock(nn.Module):
    def __init__(self, plan: VAEBlockPlan) -> None:
        super().__init__()
        self.resnets = [ResnetBlock2D(r) for r in plan.resnets]
        if plan.resample:
            self.downsamplers = [Downsample2D(plan.out_channels, padding=0)]

    def __call__(self, x: mx.array) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if "downsamplers" in self else x


class DecoderBlock(nn.Module):
    def __init__(self, plan: VAEBlockPlan) -> None:
        super().__init__()
        self.resnets = [ResnetBlock2D(r) for r in plan.resnets]
        if plan.resample:
            self.upsamplers = [Upsample2D(plan.out_channels)]

    def __call__(self, x: mx.array) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if "upsamplers" in self else x

    def over_bands(self, bands: list[mx.array], streams: list[mx.Stream]) -> list[mx.array]:
        for resnet in self.resnets:
            bands = resnet.over_bands(bands, streams)
        return self.upsamplers[0].over_bands(bands, streams) if "upsamplers" in self else bands


def band_streams(stream_set: StreamSet | None, rows: int) -> list[mx.Stream]:
    """The streams to split ``rows`` over: none when there is one stream or too few rows to share."""
    if stream_set is None or len(stream_set) < 2:
        return []
    return stream_set.streams[:min(len(stream_set), rows // 4)] if rows >= 8 else []


class Encoder(nn.Module):
    def __init__(self, plan: CoderPlan) -> None:
        super().__init__()
        self.conv_in = StripConv2d(*plan.conv_in, 3, padding=1)
        self.down_blocks = [EncoderBlock(block) for block in plan.blocks]
        self.mid_block = UNetMidBlock2D(plan.mid_block)
        self.conv_norm_out = group_norm(plan.groups, plan.conv_out[0], VAE_EPS)
        self.conv_out = nn.Conv2d(*plan.conv_out, 3, padding=1)

        self.stream_set: StreamSet | None = None

    def __call__(self, x: mx.array) -> mx.array:
        streams = band_streams(self.stream_set, x.shape[1])
        if len(streams) < 2:
            x = self.conv_in(x)
            for block in self.down_blocks:
                x = block(x)
                mx.eval(x)
        else:
            with self.stream_set.sharing_cores(len(streams)):
                x = self._down_over_bands(x)
        x = self.mid_block(x)
        return self.conv_out(silu(self.conv_norm_out(x)))

    def _down_over_bands(self, x: mx.array) -> mx.array:
        """Resnets on row bands, one stream each; the stride-2 downsampling on the joined image."""
        streams = band_streams(self.stream_set, x.shape[1])
        bands = self.conv_in.over_bands(split_axis(x, len(streams), axis=1), streams)
        for block in self.down_blocks:
            for resnet in block.resnets:
                bands = resnet.over_bands(bands, streams)
            x = mx.concatenate(bands, axis=1)
            if "downsamplers" in block:
                x = block.downsamplers[0](x)
            mx.eval(x)
            streams = band_streams(self.stream_set, x.shape[1])
            if len(streams) < 2:
                streams = [mx.default_stream(mx.default_device())]
            bands = split_axis(x, len(streams), axis=1)
        return mx.concatenate(bands, axis=1) if len(bands) > 1 else bands[0]


class Decoder(nn.Module):
    def __init__(self, plan: CoderPlan) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(*plan.conv_in, 3, padding=1)
        self.mid_block = UNetMidBlock2D(plan.mid_block)
        self.up_blocks = [DecoderBlock(block) for block in plan.blocks]
        self.conv_norm_out = group_norm(plan.groups, plan.conv_out[0], VAE_EPS)
        self.conv_out = StripConv2d(*plan.conv_out, 3, padding=1)

        self.stream_set: StreamSet | None = None

    def __call__(self, z: mx.array) -> mx.array:
        x = self.mid_block(self.conv_in(z))
        streams = band_streams(self.stream_set, x.shape[1])
        if len(streams) < 2:
            for block in self.up_blocks:
                x = block(x)
                mx.eval(x)  # one block's activations alive at a time: the decoder's peak is its last block
            return self.conv_out(silu(self.conv_norm_out(x)))
        # CPU: row bands, each on its own stream (one core each); the mid block stays whole (attention).
        with self.stream_set.sharing_cores(len(streams)):
            bands = split_axis(x, len(streams), axis=1)
            for block in self.up_blocks:
                bands = block.over_bands(bands, streams)
                mx.eval(bands)
            bands = self.conv_out.over_bands(self.conv_norm_out.over_bands(bands, streams, silu=True), streams)
            x = mx.concatenate(bands, axis=1)
            mx.eval(x)
        return x


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.plan = plan = vae_plan(config)
        self.encoder = Encoder(plan.encoder)
        self.decoder = Decoder(plan.decoder)
        lc = plan.latent_channels
        if plan.quant_conv:
            self.quant_conv = nn.Linear(2 * lc, 2 * lc)  # 1x1 convolutions
        if plan.post_quant_conv:
            self.post_quant_conv = nn.Linear(lc, lc)

    def encode(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """Posterior (mean, logvar) of NHWC images in [-1, 1]; latents are unscaled."""
        moments = self.encoder(x)
        if "quant_conv" in self:
            moments = self.quant_conv(moments)
        mean, logvar = mx.split(moments, 2, axis=-1)
        return mean, mx.clip(logvar, -30.0, 20.0)

    def set_stream_set(self, stream_set: StreamSet | None) -> None:
        """Split large feature maps into row bands run on these CPU streams (None: one stream)."""
        self.encoder.stream_set = stream_set
        self.decoder.stream_set = stream_set

    def decode(self, z: mx.array) -> mx.array:
        """NHWC images in about [-1, 1] from unscaled latents."""
        if "post_quant_conv" in self:
            z = self.post_quant_conv(z)
        return self.decoder(z)
