"""UNet3DConditionModel (ModelScope, Zeroscope) in PyTorch; mirrors backends/mlx/unet3d.py (NCHW)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...config import UNet3DConfig
from .layers import Downsample2D, ResnetBlock2D, Upsample2D, group_norm, timestep_embedding
from .motion import TemporalTransformer
from .unet import TimestepEmbedding, Transformer2DModel


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


def _temporal_attention(cfg: UNet3DConfig, channels: int, head_dim: int) -> TemporalTransformer:
    return TemporalTransformer(channels, channels // head_dim, head_dim, 1, cfg.norm_num_groups, None)


def _spatial_attention(cfg: UNet3DConfig, channels: int, head_dim: int) -> Transformer2DModel:
    # diffusers' 3D blocks default to linear projections (unlike the 2D ones)
    return Transformer2DModel(channels, channels // head_dim, 1, cfg.cross_attention_dim, cfg.norm_num_groups,
                              False, False, True)


class Block3D(nn.Module):
    def __init__(self, cfg: UNet3DConfig, in_channels: list[int], out: int, head_dim: int, cross: bool,
                 temb: int) -> None:
        super().__init__()
        groups, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList([ResnetBlock2D(c, out, temb, groups, eps) for c in in_channels])
        self.temp_convs = nn.ModuleList([TemporalConvLayer(out, groups) for _ in in_channels])
        self.attentions = nn.ModuleList([_spatial_attention(cfg, out, head_dim) for _ in in_channels]) \
            if cross else None
        self.temp_attentions = nn.ModuleList([_temporal_attention(cfg, out, head_dim) for _ in in_channels]) \
            if cross else None

    def layer(self, j, x, temb, context, f):
        x = self.temp_convs[j](self.resnets[j](x, temb), f)
        if self.attentions is not None:
            x = self.temp_attentions[j](self.attentions[j](x, context), f)
        return x


class DownBlock3D(Block3D):
    def __init__(self, cfg: UNet3DConfig, index: int, in_channels: int, temb: int) -> None:
        out = cfg.block_out_channels[index]
        super().__init__(cfg, [in_channels] + [out] * (cfg.layers_per_block - 1), out, cfg.attention_head_dim[index],
                         cfg.down_block_types[index] == "CrossAttnDownBlock3D", temb)
        self.downsamplers = nn.ModuleList([Downsample2D(out, cfg.downsample_padding)]) \
            if index < len(cfg.block_out_channels) - 1 else None

    def forward(self, x, temb, context, f):
        states = []
        for j in range(len(self.resnets)):
            x = self.layer(j, x, temb, context, f)
            states.append(x)
        if self.downsamplers is not None:
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
        self.upsamplers = nn.ModuleList([Upsample2D(out)]) if index < n - 1 else None

    def forward(self, x, skips, temb, context, f, upsample_size):
        for j in range(len(self.resnets)):
            x = self.layer(j, torch.cat([x, skips.pop()], dim=1), temb, context, f)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class UNetMidBlock3DCrossAttn(nn.Module):
    def __init__(self, cfg: UNet3DConfig, temb: int) -> None:
        super().__init__()
        c, d = cfg.block_out_channels[-1], cfg.attention_head_dim[-1]
        groups, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList([ResnetBlock2D(c, c, temb, groups, eps) for _ in range(2)])
        self.temp_convs = nn.ModuleList([TemporalConvLayer(c, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([_spatial_attention(cfg, c, d)])
        self.temp_attentions = nn.ModuleList([_temporal_attention(cfg, c, d)])

    def forward(self, x, temb, context, f):
        x = self.temp_convs[0](self.resnets[0](x, temb), f)
        x = self.temp_attentions[0](self.attentions[0](x, context), f)
        return self.temp_convs[1](self.resnets[1](x, temb), f)


class UNet3DConditionModel(nn.Module):
    motion = None

    def __init__(self, config: UNet3DConfig) -> None:
        super().__init__()
        self.config = config
        c0 = config.block_out_channels[0]
        temb = 4 * c0
        self.conv_in = nn.Conv2d(config.in_channels, c0, 3, padding=1)
        self.time_embedding = TimestepEmbedding(c0, temb)
        self.transformer_in = TemporalTransformer(c0, 8, config.attention_head_dim[0], 1, config.norm_num_groups,
                                                  None)
        blocks, in_ch = [], c0
        for i in range(len(config.block_out_channels)):
            blocks.append(DownBlock3D(config, i, in_ch, temb))
            in_ch = config.block_out_channels[i]
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = UNetMidBlock3DCrossAttn(config, temb)
        self.up_blocks = nn.ModuleList([UpBlock3D(config, i, temb) for i in range(len(config.block_out_channels))])
        self.conv_norm_out = group_norm(config.norm_num_groups, c0, config.norm_eps)
        self.conv_out = nn.Conv2d(c0, config.out_channels, 3, padding=1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                num_frames: int | None = None) -> torch.Tensor:
        f = num_frames or 1
        bf = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(bf)
        temb = self.time_embedding(timestep_embedding(t, self.config.block_out_channels[0], True, 0).to(sample.dtype))
        x = self.transformer_in(self.conv_in(sample), f)
        skips = [x]
        for block in self.down_blocks:
            x, states = block(x, temb, encoder_hidden_states, f)
            skips.extend(states)
        x = self.mid_block(x, temb, encoder_hidden_states, f)
        for block in self.up_blocks:
            n = len(block.resnets)
            own, skips = skips[-n:], skips[:-n]
            size = tuple(skips[-1].shape[2:]) if skips else None
            x = block(x, own, temb, encoder_hidden_states, f, size)
        return self.conv_out(F.silu(self.conv_norm_out(x)))
