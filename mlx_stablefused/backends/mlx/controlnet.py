"""diffusers' ControlNetModel in MLX: the UNet's encoder (its blocks, shared with the UNet) over the latent plus
the embedded control image, and a zero convolution on every skip state and on the mid block's output; built
from a topology plan (mlx_stablefused.topology.controlnet_plan)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ...config import ControlNetConfig
from ...topology import ConditioningEmbeddingPlan, controlnet_plan
from .cpu_math import silu
from .layers import timestep_embedding
from .unet import ConditionalUNet, DownBlock, TimestepEmbedding, UNetMidBlock2DCrossAttn


class ControlNetConditioningEmbedding(nn.Module):
    def __init__(self, plan: ConditioningEmbeddingPlan) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(plan.in_channels, plan.widths[0], 3, padding=1)
        self.blocks = [nn.Conv2d(a, b, 3, stride=s, padding=1) for a, b, s in plan.blocks]
        self.conv_out = nn.Conv2d(plan.widths[-1], plan.out_channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        x = silu(self.conv_in(x))
        for block in self.blocks:
            x = silu(block(x))
        return self.conv_out(x)


class ControlNetModel(ConditionalUNet):
    """Takes what the UNet takes plus ``controlnet_cond`` (the control image, NHWC in [0, 1]); returns the
    residuals the UNet adds (``down_block_additional_residuals``, ``mid_block_additional_residual``)."""

    def __init__(self, config: ControlNetConfig) -> None:
        super().__init__()
        self.config = config
        self.cn_plan = plan = controlnet_plan(config)
        self.plan = encoder = plan.encoder  # what the inherited text_time_embedding reads
        c0 = encoder.base_channels
        self.conv_in = nn.Conv2d(encoder.in_channels, c0, 3, padding=1)
        self.time_embedding = TimestepEmbedding(c0, encoder.temb_channels)
        if encoder.text_time is not None:
            self.add_embedding = TimestepEmbedding(encoder.text_time.in_dim, encoder.temb_channels)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(plan.embedding)
        self.down_blocks = [DownBlock(block) for block in encoder.down_blocks]
        self.controlnet_down_blocks = [nn.Conv2d(c, c, 1) for c in plan.skip_channels]
        self.mid_block = UNetMidBlock2DCrossAttn(encoder.mid_block)
        self.controlnet_mid_block = nn.Conv2d(plan.mid_channels, plan.mid_channels, 1)

    def __call__(self, sample: mx.array, timestep: mx.array, encoder_hidden_states: mx.array,
                 controlnet_cond: mx.array, conditioning_scale: float = 1.0, guess_mode: bool = False,
                 added_cond_kwargs: dict[str, mx.array] | None = None) -> tuple[list[mx.array], mx.array]:
        encoder = self.plan
        b = sample.shape[0]
        t = mx.broadcast_to(mx.array(timestep).reshape(-1), (b,))
        t_emb = timestep_embedding(t, encoder.base_channels, encoder.flip_sin_to_cos,
                                   encoder.freq_shift).astype(sample.dtype)
        temb = self.time_embedding(t_emb)
        if "add_embedding" in self:
            temb = temb + self.add_embedding(self.text_time_embedding(added_cond_kwargs, b, temb.dtype))
        if self.cn_plan.bgr:
            controlnet_cond = controlnet_cond[..., ::-1]
        x = self.conv_in(sample) + self.controlnet_cond_embedding(controlnet_cond)
        states = [x]
        for block in self.down_blocks:
            x, block_states = block(x, temb, encoder_hidden_states)
            states.extend(block_states)
        x = self.mid_block(x, temb, encoder_hidden_states)
        down = [conv(s) for conv, s in zip(self.controlnet_down_blocks, states)]
        mid = self.controlnet_mid_block(x)
        scales = self.cn_plan.residual_scales(conditioning_scale, guess_mode)
        down = [r * s for r, s in zip(down, scales)]
        mid = mid * scales[-1]
        if self.cn_plan.global_pool:
            down = [mx.mean(r, axis=(1, 2), keepdims=True) for r in down]
            mid = mx.mean(mid, axis=(1, 2), keepdims=True)
        return down, mid


__all__ = ["ControlNetModel"]
