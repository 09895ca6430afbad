"""UNet2DConditionModel (SD 1.x / 2.x) in PyTorch, built from its diffusers config; mirrors the MLX module."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...config import MotionConfig, UNetConfig
from .layers import (Attention, Downsample2D, FeedForward, ResnetBlock2D, Upsample2D, group_norm,
                     timestep_embedding)
from .motion import AnimateDiffTransformer3D


def motion_modules(cfg: UNetConfig, motion: MotionConfig, channels: int, heads: int, layers: int,
                   count: int) -> nn.ModuleList:
    return nn.ModuleList([AnimateDiffTransformer3D(channels, heads, layers, cfg.norm_num_groups, motion.max_seq_length)
                          for _ in range(count)])


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

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    def __init__(self, channels: int, heads: int, num_layers: int, cross_attention_dim: int, groups: int,
                 bias: bool, upcast: bool, linear_projection: bool) -> None:
        super().__init__()
        self.norm = group_norm(groups, channels, 1e-6)
        self.linear_projection = linear_projection
        proj = (lambda: nn.Linear(channels, channels)) if linear_projection else (
            lambda: nn.Conv2d(channels, channels, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(channels, heads, channels // heads, cross_attention_dim, bias, upcast)
            for _ in range(num_layers)])
        self.proj_out = proj()

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        if self.linear_projection:
            y = self.proj_in(y.permute(0, 2, 3, 1).reshape(b, h * w, c))
        else:
            y = self.proj_in(y).permute(0, 2, 3, 1).reshape(b, h * w, c)
        for block in self.transformer_blocks:
            y = block(y, context)
        if self.linear_projection:
            y = self.proj_out(y).reshape(b, h, w, c).permute(0, 3, 1, 2)
        else:
            y = self.proj_out(y.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous())
        return x + y


def _transformer(cfg: UNetConfig, channels: int, heads: int, layers: int) -> Transformer2DModel:
    return Transformer2DModel(channels, heads, layers, cfg.cross_attention_dim, cfg.norm_num_groups,
                              cfg.attention_bias, cfg.upcast_attention, cfg.use_linear_projection)


class DownBlock(nn.Module):
    def __init__(self, cfg: UNetConfig, index: int, in_channels: int, temb_channels: int, cross: bool,
                 motion: MotionConfig | None = None) -> None:
        super().__init__()
        out = cfg.block_out_channels[index]
        layers = cfg.layers_per_block[index]
        self.motion_modules = motion_modules(cfg, motion, out, motion.num_attention_heads[index],
                                             motion.transformer_layers_per_block[index], layers) if motion else None
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels if j == 0 else out, out, temb_channels, cfg.norm_num_groups, cfg.norm_eps)
            for j in range(layers)])
        self.attentions = nn.ModuleList([
            _transformer(cfg, out, cfg.num_attention_heads[index], cfg.transformer_layers_per_block[index])
            for _ in range(layers)]) if cross else None
        self.downsamplers = nn.ModuleList([Downsample2D(out, cfg.downsample_padding)]) \
            if index < len(cfg.block_out_channels) - 1 else None

    def forward(self, x, temb, context, num_frames=None):
        states = []
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context)
            if num_frames is not None:
                x = self.motion_modules[j](x, num_frames)
            states.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            states.append(x)
        return x, states


class UpBlock(nn.Module):
    def __init__(self, cfg: UNetConfig, index: int, temb_channels: int, cross: bool,
                 motion: MotionConfig | None = None) -> None:
        super().__init__()
        rev = cfg.block_out_channels[::-1]
        n = len(rev)
        out, prev_out, skip_in = rev[index], rev[max(index - 1, 0)], rev[min(index + 1, n - 1)]
        layers = cfg.layers_per_block[::-1][index] + 1
        self.resnets = nn.ModuleList([
            ResnetBlock2D((prev_out if j == 0 else out) + (skip_in if j == layers - 1 else out), out, temb_channels,
                          cfg.norm_num_groups, cfg.norm_eps)
            for j in range(layers)])
        self.attentions = nn.ModuleList([
            _transformer(cfg, out, cfg.num_attention_heads[::-1][index], cfg.transformer_layers_per_block[::-1][index])
            for _ in range(layers)]) if cross else None
        r = n - 1 - index
        self.motion_modules = motion_modules(cfg, motion, out, motion.num_attention_heads[r],
                                             motion.transformer_layers_per_block[r], layers) if motion else None
        self.upsamplers = nn.ModuleList([Upsample2D(out)]) if index < n - 1 else None

    def forward(self, x, skips, temb, context, upsample_size, num_frames=None):
        for j, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context)
            if num_frames is not None:
                x = self.motion_modules[j](x, num_frames)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class UNetMidBlock2DCrossAttn(nn.Module):
    def __init__(self, cfg: UNetConfig, temb_channels: int, motion: MotionConfig | None = None) -> None:
        super().__init__()
        c = cfg.block_out_channels[-1]
        self.motion_modules = motion_modules(cfg, motion, c, motion.num_attention_heads[-1],
                                             motion.mid_transformer_layers, 1) \
            if motion is not None and motion.use_mid_block else None
        self.resnets = nn.ModuleList([ResnetBlock2D(c, c, temb_channels, cfg.norm_num_groups, cfg.norm_eps)
                                      for _ in range(2)])
        self.attentions = nn.ModuleList([_transformer(cfg, c, cfg.num_attention_heads[-1],
                                                      cfg.transformer_layers_per_block[-1])])

    def forward(self, x, temb, context, num_frames=None):
        x = self.attentions[0](self.resnets[0](x, temb), context)
        if num_frames is not None and self.motion_modules is not None:
            x = self.motion_modules[0](x, num_frames)
        return self.resnets[1](x, temb)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


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
        blocks, in_ch = [], c0
        for i, kind in enumerate(config.down_block_types):
            blocks.append(DownBlock(config, i, in_ch, temb, kind == "CrossAttnDownBlock2D", motion))
            in_ch = config.block_out_channels[i]
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = UNetMidBlock2DCrossAttn(config, temb, motion) if config.mid_block_type is not None else None
        self.up_blocks = nn.ModuleList([UpBlock(config, i, temb, kind == "CrossAttnUpBlock2D", motion)
                                        for i, kind in enumerate(config.up_block_types)])
        self.conv_norm_out = group_norm(config.norm_num_groups, c0, config.norm_eps)
        self.conv_out = nn.Conv2d(c0, config.out_channels, 3, padding=1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                num_frames: int | None = None):
        if num_frames is not None and self.motion is None:
            raise ValueError("num_frames needs a UNet built with a motion adapter")
        b = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(b)
        t_emb = timestep_embedding(t, self.config.block_out_channels[0], self.config.flip_sin_to_cos,
                                   self.config.freq_shift).to(sample.dtype)
        temb = self.time_embedding(t_emb)
        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, states = block(x, temb, encoder_hidden_states, num_frames)
            skips.extend(states)
        if self.mid_block is not None:
            x = self.mid_block(x, temb, encoder_hidden_states, num_frames)
        for block in self.up_blocks:
            n = len(block.resnets)
            own, skips = skips[-n:], skips[:-n]
            size = tuple(skips[-1].shape[2:]) if skips else None
            x = block(x, own, temb, encoder_hidden_states, size, num_frames)
        return self.conv_out(F.silu(self.conv_norm_out(x)))
