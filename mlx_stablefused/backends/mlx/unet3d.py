"""UNet3DConditionModel (ModelScope text-to-video, Zeroscope) in MLX, built from its diffusers config.

Every spatial layer is SD's, run per frame (frames in the batch, frame-minor); after each resnet a
temporal convolution, and after each spatial transformer a temporal transformer, mix the frames.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ...config import UNet3DConfig
from .cpu_math import silu
from .layers import Downsample2D, ResnetBlock2D, Upsample2D, group_norm, timestep_embedding
from .motion import TemporalTransformer
from .unet import TimestepEmbedding, Transformer2DModel


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


def _temporal_attention(cfg: UNet3DConfig, channels: int, head_dim: int) -> TemporalTransformer:
    return TemporalTransformer(channels, channels // head_dim, head_dim, 1, cfg.norm_num_groups, None)


def _spatial_attention(cfg: UNet3DConfig, channels: int, head_dim: int) -> Transformer2DModel:
    return Transformer2DModel(channels, channels // head_dim, 1, cfg.cross_attention_dim, cfg.norm_num_groups,
                              False, False)


class Block3D(nn.Module):
    """Down or up block: resnet -> temporal conv [-> spatial attention -> temporal attention] per layer."""

    def __init__(self, cfg: UNet3DConfig, in_channels: list[int], out: int, head_dim: int, cross: bool,
                 temb: int) -> None:
        super().__init__()
        groups, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = [ResnetBlock2D(c, out, temb, groups, eps) for c in in_channels]
        self.temp_convs = [TemporalConvLayer(out, groups) for _ in in_channels]
        if cross:
            self.attentions = [_spatial_attention(cfg, out, head_dim) for _ in in_channels]
            self.temp_attentions = [_temporal_attention(cfg, out, head_dim) for _ in in_channels]

    def layer(self, j: int, x: mx.array, temb: mx.array, context: mx.array, f: int) -> mx.array:
        x = self.temp_convs[j](self.resnets[j](x, temb), f)
        if "attentions" in self:
            x = self.temp_attentions[j](self.attentions[j](x, context), f)
        return x


class DownBlock3D(Block3D):
    def __init__(self, cfg: UNet3DConfig, index: int, in_channels: int, temb: int) -> None:
        out = cfg.block_out_channels[index]
        super().__init__(cfg, [in_channels] + [out] * (cfg.layers_per_block - 1), out, cfg.attention_head_dim[index],
                         cfg.down_block_types[index] == "CrossAttnDownBlock3D", temb)
        if index < len(cfg.block_out_channels) - 1:
            self.downsamplers = [Downsample2D(out, cfg.downsample_padding)]

    def __call__(self, x, temb, context, f):
        states = []
        for j in range(len(self.resnets)):
            x = self.layer(j, x, temb, context, f)
            states.append(x)
        if "downsamplers" in self:
            x = self.downsamplers[0](x)
            states.append(x)
        return x, states


class UpBlock3D(Block3D):
    def __init__(self, cfg: UNet3DConfig, index: int, temb: int) -> None:
        rev = cfg.block_out_channels[::-1]
        n = len(rev)
        out, prev_out, skip_in = rev[index], rev[max(index - 1, 0)], rev[min(index + 1, n - 1)]
        layers = cfg.layers_per_block + 1
        ins = [(prev_out if j == 0 else out) + (skip_in if j == layers - 1 else out) for j in range(layers)]
        super().__init__(cfg, ins, out, cfg.attention_head_dim[::-1][index],
                         cfg.up_block_types[index] == "CrossAttnUpBlock3D", temb)
        if index < n - 1:
            self.upsamplers = [Upsample2D(out)]

    def __call__(self, x, skips, temb, context, f, upsample_size):
        for j in range(len(self.resnets)):
            x = self.layer(j, mx.concatenate([x, skips.pop()], axis=-1), temb, context, f)
        if "upsamplers" in self:
            x = self.upsamplers[0](x, upsample_size)
        return x


class UNetMidBlock3DCrossAttn(nn.Module):
    def __init__(self, cfg: UNet3DConfig, temb: int) -> None:
        super().__init__()
        c, d = cfg.block_out_channels[-1], cfg.attention_head_dim[-1]
        groups, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = [ResnetBlock2D(c, c, temb, groups, eps) for _ in range(2)]
        self.temp_convs = [TemporalConvLayer(c, groups) for _ in range(2)]
        self.attentions = [_spatial_attention(cfg, c, d)]
        self.temp_attentions = [_temporal_attention(cfg, c, d)]

    def __call__(self, x, temb, context, f):
        x = self.temp_convs[0](self.resnets[0](x, temb), f)
        x = self.temp_attentions[0](self.attentions[0](x, context), f)
        return self.temp_convs[1](self.resnets[1](x, temb), f)


class UNet3DConditionModel(nn.Module):
    motion = None  # no motion adapter: the temporal layers are part of the model

    def __init__(self, config: UNet3DConfig) -> None:
        super().__init__()
        self.config = config
        c0 = config.block_out_channels[0]
        temb = 4 * c0
        self.conv_in = nn.Conv2d(config.in_channels, c0, 3, padding=1)
        self.time_embedding = TimestepEmbedding(c0, temb)
        self.transformer_in = TemporalTransformer(c0, 8, config.attention_head_dim[0], 1, config.norm_num_groups,
                                                  None)
        self.down_blocks = []
        in_ch = c0
        for i in range(len(config.block_out_channels)):
            self.down_blocks.append(DownBlock3D(config, i, in_ch, temb))
            in_ch = config.block_out_channels[i]
        self.mid_block = UNetMidBlock3DCrossAttn(config, temb)
        self.up_blocks = [UpBlock3D(config, i, temb) for i in range(len(config.block_out_channels))]
        self.conv_norm_out = group_norm(config.norm_num_groups, c0, config.norm_eps)
        self.conv_out = nn.Conv2d(c0, config.out_channels, 3, padding=1)

    def __call__(self, sample: mx.array, timestep: mx.array, encoder_hidden_states: mx.array,
                 num_frames: int | None = None) -> mx.array:
        """``sample`` (B*F, h, w, C) frame-minor; context already repeated per frame."""
        f = num_frames or 1
        bf = sample.shape[0]
        t = mx.broadcast_to(mx.array(timestep).reshape(-1), (bf,))
        temb = self.time_embedding(timestep_embedding(t, self.config.block_out_channels[0], True, 0).astype(
            sample.dtype))
        ctx = encoder_hidden_states
        x = self.transformer_in(self.conv_in(sample), f)
        skips = [x]
        for block in self.down_blocks:
            x, states = block(x, temb, ctx, f)
            skips.extend(states)
        x = self.mid_block(x, temb, ctx, f)
        for block in self.up_blocks:
            n = len(block.resnets)
            own, skips = skips[-n:], skips[:-n]
            size = (skips[-1].shape[1], skips[-1].shape[2]) if skips else None
            x = block(x, own, temb, ctx, f, size)
        return self.conv_out(silu(self.conv_norm_out(x)))
