"""UNet3DConditionModel (ModelScope text-to-video, Zeroscope) in MLX, built from its topology plan.

Every spatial layer is SD's, run per frame (frames in the batch, frame-minor); after each resnet a
temporal convolution, and after each spatial transformer a temporal transformer, mix the frames.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ...config import UNet3DConfig
from ...topology import DownBlockPlan, MidBlockPlan, UpBlockPlan, unet3d_plan
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


class Block3D(nn.Module):
    """Down, mid or up block: resnet -> temporal conv [-> spatial attention -> temporal attention] per layer."""

    def __init__(self, plan: DownBlockPlan | MidBlockPlan | UpBlockPlan, carriers: int) -> None:
        """``carriers``: how many resnets carry attention (all but the mid block's last)."""
        super().__init__()
        self.resnets = [ResnetBlock2D(r) for r in plan.resnets]
        self.temp_convs = [TemporalConvLayer(r.out_channels, r.groups) for r in plan.resnets]
        if plan.attention is not None:
            self.attentions = [Transformer2DModel(plan.attention) for _ in range(carriers)]
            self.temp_attentions = [TemporalTransformer(plan.temporal_attention) for _ in range(carriers)]

    def layer(self, j: int, x: mx.array, temb: mx.array, context: mx.array, f: int) -> mx.array:
        x = self.temp_convs[j](self.resnets[j](x, temb), f)
        if "attentions" in self and j < len(self.attentions):
            x = self.temp_attentions[j](self.attentions[j](x, context), f)
        return x


class DownBlock3D(Block3D):
    def __init__(self, plan: DownBlockPlan) -> None:
        super().__init__(plan, len(plan.resnets))
        if plan.downsample:
            self.downsamplers = [Downsample2D(plan.out_channels, plan.downsample_padding)]

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
    def __init__(self, plan: UpBlockPlan) -> None:
        super().__init__(plan, len(plan.resnets))
        if plan.upsample:
            self.upsamplers = [Upsample2D(plan.out_channels)]

    def __call__(self, x, skips, temb, context, f, upsample_size):
        for j in range(len(self.resnets)):
            x = self.layer(j, mx.concatenate([x, skips.pop()], axis=-1), temb, context, f)
        if "upsamplers" in self:
            x = self.upsamplers[0](x, upsample_size)
        return x


class UNetMidBlock3DCrossAttn(Block3D):
    def __init__(self, plan: MidBlockPlan) -> None:
        super().__init__(plan, 1)

    def __call__(self, x, temb, context, f):
        return self.layer(1, self.layer(0, x, temb, context, f), temb, context, f)


class UNet3DConditionModel(nn.Module):
    motion = None  # no motion adapter: the temporal layers are part of the model

    def __init__(self, config: UNet3DConfig) -> None:
        super().__init__()
        self.config = config
        self.plan = plan = unet3d_plan(config)
        c0 = plan.base_channels
        self.conv_in = nn.Conv2d(plan.in_channels, c0, 3, padding=1)
        self.time_embedding = TimestepEmbedding(c0, plan.temb_channels)
        self.transformer_in = TemporalTransformer(plan.transformer_in)
        self.down_blocks = [DownBlock3D(block) for block in plan.down_blocks]
        self.mid_block = UNetMidBlock3DCrossAttn(plan.mid_block)
        self.up_blocks = [UpBlock3D(block) for block in plan.up_blocks]
        self.conv_norm_out = group_norm(plan.groups, c0, plan.eps)
        self.conv_out = nn.Conv2d(c0, plan.out_channels, 3, padding=1)

    def __call__(self, sample: mx.array, timestep: mx.array, encoder_hidden_states: mx.array,
                 num_frames: int | None = None) -> mx.array:
        """``sample`` (B*F, h, w, C) frame-minor; context already repeated per frame."""
        f = num_frames or 1
        bf = sample.shape[0]
        t = mx.broadcast_to(mx.array(timestep).reshape(-1), (bf,))
        t_emb = timestep_embedding(t, self.plan.base_channels, self.plan.flip_sin_to_cos, self.plan.freq_shift)
        temb = self.time_embedding(t_emb.astype(sample.dtype))
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
