"""UNet2DConditionModel (SD 1.x / 2.x) in MLX, built from its diffusers config."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ...config import MotionConfig, UNetConfig
from .cpu_math import silu
from .layers import (Attention, Downsample2D, FeedForward, ResnetBlock2D, Upsample2D, group_norm,
                     timestep_embedding)
from .motion import AnimateDiffTransformer3D


def motion_modules(cfg: UNetConfig, motion: MotionConfig, channels: int, heads: int, layers: int,
                   count: int) -> list[AnimateDiffTransformer3D]:
    """``count`` motion modules at ``channels``; their GroupNorm uses the UNet's group count, as diffusers."""
    return [AnimateDiffTransformer3D(channels, heads, layers, cfg.norm_num_groups, motion.max_seq_length)
            for _ in range(count)]


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, cross_attention_dim: int, bias: bool,
                 upcast: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn1 = Attention(dim, heads, dim_head, bias=bias, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.attn2 = Attention(dim, heads, dim_head, cross_attention_dim=cross_attention_dim, bias=bias,
                               upcast=upcast)
        self.norm3 = nn.LayerNorm(dim, eps=1e-5)
        self.ff = FeedForward(dim)

    def __call__(self, x: mx.array, context: mx.array) -> mx.array:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """Spatial transformer. SD 1.x's 1x1-conv projections and SD 2.x's linear ones are the
    same operation on channels-last tensors, so both are Linear layers here."""

    def __init__(self, channels: int, heads: int, num_layers: int, cross_attention_dim: int, groups: int,
                 bias: bool, upcast: bool) -> None:
        super().__init__()
        self.norm = group_norm(groups, channels, 1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = [
            BasicTransformerBlock(channels, heads, channels // heads, cross_attention_dim, bias, upcast)
            for _ in range(num_layers)
        ]
        self.proj_out = nn.Linear(channels, channels)

    def __call__(self, x: mx.array, context: mx.array) -> mx.array:
        b, h, w, c = x.shape
        y = self.proj_in(self.norm(x).reshape(b, h * w, c))
        for block in self.transformer_blocks:
            y = block(y, context)
        return x + self.proj_out(y).reshape(b, h, w, c)


class DownBlock(nn.Module):
    """CrossAttnDownBlock2D when ``heads`` is given, else DownBlock2D."""

    def __init__(self, cfg: UNetConfig, index: int, in_channels: int, temb_channels: int, cross: bool,
                 motion: MotionConfig | None = None) -> None:
        super().__init__()
        out = cfg.block_out_channels[index]
        layers = cfg.layers_per_block[index]
        if motion is not None:
            self.motion_modules = motion_modules(cfg, motion, out, motion.num_attention_heads[index],
                                                 motion.transformer_layers_per_block[index], layers)
        self.resnets = [
            ResnetBlock2D(in_channels if j == 0 else out, out, temb_channels, cfg.norm_num_groups, cfg.norm_eps)
            for j in range(layers)
        ]
        if cross:
            self.attentions = [
                Transformer2DModel(out, cfg.num_attention_heads[index], cfg.transformer_layers_per_block[index],
                                   cfg.cross_attention_dim, cfg.norm_num_groups, cfg.attention_bias,
                                   cfg.upcast_attention)
                for _ in range(layers)
            ]
        if index < len(cfg.block_out_channels) - 1:
            self.downsamplers = [Downsample2D(out, cfg.downsample_padding)]

    def __call__(self, x: mx.array, temb: mx.array, context: mx.array,
                 num_frames: int | None = None) -> tuple[mx.array, list[mx.array]]:
        states = []
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if "attentions" in self:
                x = self.attentions[j](x, context)
            if num_frames is not None:
                x = self.motion_modules[j](x, num_frames)
            states.append(x)
        if "downsamplers" in self:
            x = self.downsamplers[0](x)
            states.append(x)
        return x, states


class UpBlock(nn.Module):
    """CrossAttnUpBlock2D when ``cross``, else UpBlock2D; ``index`` counts from the lowest resolution."""

    def __init__(self, cfg: UNetConfig, index: int, temb_channels: int, cross: bool,
                 motion: MotionConfig | None = None) -> None:
        super().__init__()
        rev_channels = cfg.block_out_channels[::-1]
        n = len(rev_channels)
        out = rev_channels[index]
        prev_out = rev_channels[max(index - 1, 0)]
        skip_in = rev_channels[min(index + 1, n - 1)]
        layers = cfg.layers_per_block[::-1][index] + 1
        self.resnets = []
        for j in range(layers):
            res_skip = skip_in if j == layers - 1 else out
            res_in = prev_out if j == 0 else out
            self.resnets.append(ResnetBlock2D(res_in + res_skip, out, temb_channels, cfg.norm_num_groups,
                                              cfg.norm_eps))
        if cross:
            heads = cfg.num_attention_heads[::-1][index]
            tlayers = cfg.transformer_layers_per_block[::-1][index]
            self.attentions = [
                Transformer2DModel(out, heads, tlayers, cfg.cross_attention_dim, cfg.norm_num_groups,
                                   cfg.attention_bias, cfg.upcast_attention)
                for _ in range(layers)
            ]
        if motion is not None:
            r = len(rev_channels) - 1 - index
            self.motion_modules = motion_modules(cfg, motion, out, motion.num_attention_heads[r],
                                                 motion.transformer_layers_per_block[r], layers)
        if index < n - 1:
            self.upsamplers = [Upsample2D(out)]

    def __call__(self, x: mx.array, skips: list[mx.array], temb: mx.array, context: mx.array,
                 upsample_size: tuple[int, int] | None, num_frames: int | None = None) -> mx.array:
        for j, resnet in enumerate(self.resnets):
            x = resnet(mx.concatenate([x, skips.pop()], axis=-1), temb)
            if "attentions" in self:
                x = self.attentions[j](x, context)
            if num_frames is not None:
                x = self.motion_modules[j](x, num_frames)
        if "upsamplers" in self:
            x = self.upsamplers[0](x, upsample_size)
        return x


class UNetMidBlock2DCrossAttn(nn.Module):
    def __init__(self, cfg: UNetConfig, temb_channels: int, motion: MotionConfig | None = None) -> None:
        super().__init__()
        c = cfg.block_out_channels[-1]
        if motion is not None and motion.use_mid_block:
            self.motion_modules = motion_modules(cfg, motion, c, motion.num_attention_heads[-1],
                                                 motion.mid_transformer_layers, 1)
        self.resnets = [ResnetBlock2D(c, c, temb_channels, cfg.norm_num_groups, cfg.norm_eps) for _ in range(2)]
        self.attentions = [Transformer2DModel(c, cfg.num_attention_heads[-1], cfg.transformer_layers_per_block[-1],
                                              cfg.cross_attention_dim, cfg.norm_num_groups, cfg.attention_bias,
                                              cfg.upcast_attention)]

    def __call__(self, x: mx.array, temb: mx.array, context: mx.array, num_frames: int | None = None) -> mx.array:
        x = self.attentions[0](self.resnets[0](x, temb), context)
        if num_frames is not None and "motion_modules" in self:
            x = self.motion_modules[0](x, num_frames)
        return self.resnets[1](x, temb)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_2(silu(self.linear_1(x)))


class UNet2DConditionModel(nn.Module):
    """SD's UNet; with ``motion`` (an AnimateDiff adapter config) it is diffusers' UNetMotionModel."""

    def __init__(self, config: UNetConfig, motion: MotionConfig | None = None) -> None:
        super().__init__()
        self.config = config
        self.motion = motion
        if motion is not None:
            motion.check_fits(config)
        c0 = config.block_out_channels[0]
        temb = 4 * c0
        self.conv_in = nn.Conv2d(config.in_channels, c0, 3, padding=1)
        self.time_embedding = TimestepEmbedding(c0, temb)
        self.down_blocks = []
        in_ch = c0
        for i, kind in enumerate(config.down_block_types):
            self.down_blocks.append(DownBlock(config, i, in_ch, temb, kind == "CrossAttnDownBlock2D", motion))
            in_ch = config.block_out_channels[i]
        if config.mid_block_type is not None:
            self.mid_block = UNetMidBlock2DCrossAttn(config, temb, motion)
        self.up_blocks = [UpBlock(config, i, temb, kind == "CrossAttnUpBlock2D", motion)
                          for i, kind in enumerate(config.up_block_types)]
        self.conv_norm_out = group_norm(config.norm_num_groups, c0, config.norm_eps)
        self.conv_out = nn.Conv2d(c0, config.out_channels, 3, padding=1)

    def __call__(self, sample: mx.array, timestep: mx.array, encoder_hidden_states: mx.array,
                 num_frames: int | None = None) -> mx.array:
        """``sample`` NHWC; ``timestep`` a scalar or (B,) training-time value; context (B, L, D).

        With ``num_frames`` (motion UNets), the batch holds B/F videos of F frames each, frame-minor,
        and the motion modules mix information across each video's frames.
        """
        if num_frames is not None and self.motion is None:
            raise ValueError("num_frames needs a UNet built with a motion adapter")
        b = sample.shape[0]
        t = mx.broadcast_to(mx.array(timestep).reshape(-1), (b,))
        t_emb = timestep_embedding(t, self.config.block_out_channels[0], self.config.flip_sin_to_cos,
                                   self.config.freq_shift).astype(sample.dtype)
        temb = self.time_embedding(t_emb)
        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, states = block(x, temb, encoder_hidden_states, num_frames)
            skips.extend(states)
        if "mid_block" in self:
            x = self.mid_block(x, temb, encoder_hidden_states, num_frames)
        for block in self.up_blocks:
            n = len(block.resnets)
            own, skips = skips[-n:], skips[:-n]
            # Upsample to the next skip's size: exactly 2x normally, the odd size when the input was odd.
            size = (skips[-1].shape[1], skips[-1].shape[2]) if skips else None
            x = block(x, own, temb, encoder_hidden_states, size, num_frames)
        return self.conv_out(silu(self.conv_norm_out(x)))
