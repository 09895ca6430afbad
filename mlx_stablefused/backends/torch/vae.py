"""AutoencoderKL in PyTorch, built from its diffusers config; mirrors the MLX module (NCHW)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...config import VAEConfig
from .layers import Downsample2D, ResnetBlock2D, Upsample2D, attend, group_norm

VAE_EPS = 1e-6


class SpatialSelfAttention(nn.Module):
    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.group_norm = group_norm(groups, channels, VAE_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])
        self.query_chunk: int | None = None

    def set_query_chunk(self, chunk: int | None) -> None:
        self.query_chunk = chunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.group_norm(x).reshape(b, c, h * w).transpose(1, 2)[:, None]
        o = attend(self.to_q(y), self.to_k(y), self.to_v(y), self.query_chunk)
        return x + self.to_out[0](o[:, 0]).transpose(1, 2).reshape(b, c, h, w)


class UNetMidBlock2D(nn.Module):
    def __init__(self, channels: int, groups: int, add_attention: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, None, groups, VAE_EPS) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups)]) if add_attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class EncoderBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, downsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(in_channels if j == 0 else out_channels, out_channels, None,
                                                    groups, VAE_EPS) for j in range(layers)])
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, padding=0)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class DecoderBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, upsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(in_channels if j == 0 else out_channels, out_channels, None,
                                                    groups, VAE_EPS) for j in range(layers)])
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        ch = cfg.block_out_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            EncoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, cfg.norm_num_groups, i < len(ch) - 1)
            for i in range(len(ch))])
        self.mid_block = UNetMidBlock2D(ch[-1], cfg.norm_num_groups, cfg.mid_block_add_attention)
        self.conv_norm_out = group_norm(cfg.norm_num_groups, ch[-1], VAE_EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        rev = cfg.block_out_channels[::-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, rev[0], 3, padding=1)
        self.mid_block = UNetMidBlock2D(rev[0], cfg.norm_num_groups, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList([
            DecoderBlock(rev[max(i - 1, 0)], rev[i], cfg.layers_per_block + 1, cfg.norm_num_groups, i < len(rev) - 1)
            for i in range(len(rev))])
        self.conv_norm_out = group_norm(cfg.norm_num_groups, rev[-1], VAE_EPS)
        self.conv_out = nn.Conv2d(rev[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        lc = config.latent_channels
        self.quant_conv = nn.Conv2d(2 * lc, 2 * lc, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(lc, lc, 1) if config.use_post_quant_conv else None

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)
