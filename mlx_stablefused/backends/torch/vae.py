"""AutoencoderKL in PyTorch, built from its topology plan (mlx_stablefused.topology); NCHW."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...config import VAEConfig
from ...topology import VAE_EPS, CoderPlan, VAEBlockPlan, VAEMidBlockPlan, vae_plan
from .layers import Downsample2D, ResnetBlock2D, Upsample2D, attend, group_norm


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
    def __init__(self, plan: VAEMidBlockPlan) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(r) for r in plan.resnets])
        self.attentions = nn.ModuleList([SpatialSelfAttention(plan.channels, plan.groups)]) if plan.attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class EncoderBlock(nn.Module):
    def __init__(self, plan: VAEBlockPlan) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(r) for r in plan.resnets])
        self.downsamplers = nn.ModuleList([Downsample2D(plan.out_channels, padding=0)]) if plan.resample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class DecoderBlock(nn.Module):
    def __init__(self, plan: VAEBlockPlan) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(r) for r in plan.resnets])
        self.upsamplers = nn.ModuleList([Upsample2D(plan.out_channels)]) if plan.resample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class Encoder(nn.Module):
    def __init__(self, plan: CoderPlan) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(*plan.conv_in, 3, padding=1)
        self.down_blocks = nn.ModuleList([EncoderBlock(block) for block in plan.blocks])
        self.mid_block = UNetMidBlock2D(plan.mid_block)
        self.conv_norm_out = group_norm(plan.groups, plan.conv_out[0], VAE_EPS)
        self.conv_out = nn.Conv2d(*plan.conv_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, plan: CoderPlan) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(*plan.conv_in, 3, padding=1)
        self.mid_block = UNetMidBlock2D(plan.mid_block)
        self.up_blocks = nn.ModuleList([DecoderBlock(block) for block in plan.blocks])
        self.conv_norm_out = group_norm(plan.groups, plan.conv_out[0], VAE_EPS)
        self.conv_out = nn.Conv2d(*plan.conv_out, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.plan = plan = vae_plan(config)
        self.encoder = Encoder(plan.encoder)
        self.decoder = Decoder(plan.decoder)
        lc = plan.latent_channels
        self.quant_conv = nn.Conv2d(2 * lc, 2 * lc, 1) if plan.quant_conv else None
        self.post_quant_conv = nn.Conv2d(lc, lc, 1) if plan.post_quant_conv else None

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
