"""UNet3DConditionModel (ModelScope, Zeroscope) in PyTorch; mirrors backends/mlx/unet3d.py (NCHW)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...config import UNet3DConfig
from ...topology import DownBlockPlan, MidBlockPlan, UpBlockPlan, unet3d_plan
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


class Block3D(nn.Module):
    def __init__(self, plan: DownBlockPlan | MidBlockPlan | UpBlockPlan, carriers: int) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(r) for r in plan.resnets])
        self.temp_convs = nn.ModuleList([TemporalConvLayer(r.out_channels, r.groups) for r in plan.resnets])
        cross = plan.attention is not None
        self.attentions = nn.ModuleList([Transformer2DModel(plan.attention) for _ in range(carriers)]) \
            if cross else None
        self.temp_attentions = nn.ModuleList([TemporalTransformer(plan.temporal_attention)
                                              for _ in range(carriers)]) if cross else None

    def layer(self, j, x, temb, context, f):
        x = self.temp_convs[j](self.resnets[j](x, temb), f)
        if self.attentions is not None and j < len(self.attentions):
            x = self.temp_attentions[j](self.attentions[j](x, context), f)
        return x


class DownBlock3D(Block3D):
    def __init__(self, plan: DownBlockPlan) -> None:
        super().__init__(plan, len(plan.resnets))
        self.downsamplers = nn.ModuleList([Downsample2D(plan.out_channels, plan.downsample_padding)]) \
            if plan.downsample else None

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
    def __init__(self, plan: UpBlockPlan) -> None:
        super().__init__(plan, len(plan.resnets))
        self.upsamplers = nn.ModuleList([Upsample2D(plan.out_channels)]) if plan.upsample else None

    def forward(self, x, skips, temb, context, f, upsample_size):
        for j in range(len(self.resnets)):
            x = self.layer(j, torch.cat([x, skips.pop()], dim=1), temb, context, f)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class UNetMidBlock3DCrossAttn(Block3D):
    def __init__(self, plan: MidBlockPlan) -> None:
        super().__init__(plan, 1)

    def forward(self, x, temb, context, f):
        return self.layer(1, self.layer(0, x, temb, context, f), temb, context, f)


class UNet3DConditionModel(nn.Module):
    motion = None

    def __init__(self, config: UNet3DConfig) -> None:
        super().__init__()
        self.config = config
        self.plan = plan = unet3d_plan(config)
        c0 = plan.base_channels
        self.conv_in = nn.Conv2d(plan.in_channels, c0, 3, padding=1)
        self.time_embedding = TimestepEmbedding(c0, plan.temb_channels)
        self.transformer_in = TemporalTransformer(plan.transformer_in)
        self.down_blocks = nn.ModuleList([DownBlock3D(block) for block in plan.down_blocks])
        self.mid_block = UNetMidBlock3DCrossAttn(plan.mid_block)
        self.up_blocks = nn.ModuleList([UpBlock3D(block) for block in plan.up_blocks])
        self.conv_norm_out = group_norm(plan.groups, c0, plan.eps)
        self.conv_out = nn.Conv2d(c0, plan.out_channels, 3, padding=1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                num_frames: int | None = None) -> torch.Tensor:
        f = num_frames or 1
        bf = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(bf)
        t_emb = timestep_embedding(t, self.plan.base_channels, self.plan.flip_sin_to_cos, self.plan.freq_shift)
        temb = self.time_embedding(t_emb.to(sample.dtype))
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
