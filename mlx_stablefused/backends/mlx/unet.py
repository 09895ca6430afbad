"""UNet2DConditionModel (SD 1.x / 2.x, AnimateDiff's motion UNet) in MLX, and the blocks and forward it
shares with UNet3DConditionModel, built from a topology plan (mlx_stablefused.topology)."""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx
import mlx.nn as nn

from ...config import MotionConfig, UNetConfig
from ...deep_cache import FeatureSlot
from ...token_merging import NO_TOKEN_MERGE
from ...topology import AttentionPlan, DownBlockPlan, MidBlockPlan, UNetPlan, UpBlockPlan, unet_plan
from .cpu_math import silu
from .cpu_streams import mark
from .layers import (Attention, Downsample2D, FeedForward, ResnetBlock2D, Upsample2D, group_norm,
                     timestep_embedding)
from .motion import TemporalConvLayer, TemporalTransformer


class BasicTransformerBlock(nn.Module):
    token_merge = NO_TOKEN_MERGE  # ToMe (token_merging.py) sets one per block: merge/unmerge around the sub-layers

    def __init__(self, plan: AttentionPlan) -> None:
        super().__init__()
        dim, heads, dim_head, bias, upcast = plan.channels, plan.heads, plan.head_dim, plan.bias, plan.upcast
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn1 = Attention(dim, heads, dim_head, bias=bias, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.attn2 = Attention(dim, heads, dim_head, cross_attention_dim=plan.cross_attention_dim, bias=bias,
                               upcast=upcast)
        self.norm3 = nn.LayerNorm(dim, eps=1e-5)
        self.ff = FeedForward(dim)

    def __call__(self, x: mx.array, context: mx.array) -> mx.array:
        attn, cross, mlp = self.token_merge(x)  # identities unless token merging is on
        x = x + attn.unmerge(self.attn1(attn.merge(self.norm1(x))))
        x = x + cross.unmerge(self.attn2(cross.merge(self.norm2(x)), context))
        return x + mlp.unmerge(self.ff(mlp.merge(self.norm3(x))))


class Transformer2DModel(nn.Module):
    """Spatial transformer. SD 1.x's 1x1-conv projections and SD 2.x's linear ones are the
    same operation on channels-last tensors, so both are Linear layers here."""

    def __init__(self, plan: AttentionPlan) -> None:
        super().__init__()
        channels = plan.channels
        self.norm = group_norm(plan.groups, channels, 1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = [BasicTransformerBlock(plan) for _ in range(plan.layers)]
        self.proj_out = nn.Linear(channels, channels)

    def __call__(self, x: mx.array, context: mx.array) -> mx.array:
        b, h, w, c = x.shape
        y = self.proj_in(self.norm(x).reshape(b, h * w, c))
        for block in self.transformer_blocks:
            y = block(y, context)
        return x + self.proj_out(y).reshape(b, h, w, c)


class LayeredBlock(nn.Module):
    """What down, mid and up blocks share: resnets, each followed by what the plan puts on it, in
    diffusers' order: a temporal convolution (UNet3D), spatial attention, temporal attention (UNet3D),
    a motion module (AnimateDiff; run only when frames are given)."""

    def __init__(self, plan: DownBlockPlan | MidBlockPlan | UpBlockPlan, carriers: int) -> None:
        """``carriers``: how many resnets carry attention (all but the mid block's last)."""
        super().__init__()
        self.resnets = [ResnetBlock2D(r) for r in plan.resnets]
        if plan.temporal_conv:
            self.temp_convs = [TemporalConvLayer(r.out_channels, r.groups) for r in plan.resnets]
        if plan.attention is not None:
            self.attentions = [Transformer2DModel(plan.attention) for _ in range(carriers)]
        if plan.temporal_attention is not None:
            self.temp_attentions = [TemporalTransformer(plan.temporal_attention) for _ in range(carriers)]
        if plan.motion is not None:
            self.motion_modules = [TemporalTransformer(plan.motion) for _ in range(carriers)]
        self._carriers = carriers

    def layer(self, j: int, x: mx.array, temb: mx.array, context: mx.array, num_frames: int | None) -> mx.array:
        x = self.resnets[j](x, temb)
        if "temp_convs" in self:
            x = self.temp_convs[j](x, num_frames)
        if j < self._carriers:
            if "attentions" in self:
                x = self.attentions[j](x, context)
            if "temp_attentions" in self:
                x = self.temp_attentions[j](x, num_frames)
            if num_frames is not None and "motion_modules" in self:
                x = self.motion_modules[j](x, num_frames)
        return mark(x)  # a point where parallel CPU streams are encoded in turn (cpu_streams.eval_in_lockstep)


class DownBlock(LayeredBlock):
    """CrossAttnDownBlock2D when the plan has attention, else DownBlock2D (UNet3D: the 3D blocks)."""

    def __init__(self, plan: DownBlockPlan) -> None:
        super().__init__(plan, len(plan.resnets))
        if plan.downsample:
            self.downsamplers = [Downsample2D(plan.out_channels, plan.downsample_padding)]

    def __call__(self, x: mx.array, temb: mx.array, context: mx.array, num_frames: int | None = None,
                 states_wanted: int | None = None) -> tuple[mx.array, list[mx.array]]:
        """``states_wanted``: stop after making that many skip states (DeepCache's shallow calls; None: all)."""
        states = []
        for j in range(len(self.resnets)):
            if states_wanted is not None and len(states) == states_wanted:
                return x, states
            x = self.layer(j, x, temb, context, num_frames)
            states.append(x)
        if "downsamplers" in self and states_wanted != len(states):
            x = self.downsamplers[0](x)
            states.append(x)
        return x, states


class UpBlock(LayeredBlock):
    """CrossAttnUpBlock2D when the plan has attention, else UpBlock2D (UNet3D: the 3D blocks)."""

    def __init__(self, plan: UpBlockPlan) -> None:
        super().__init__(plan, len(plan.resnets))
        if plan.upsample:
            self.upsamplers = [Upsample2D(plan.out_channels)]

    def __call__(self, x: mx.array, skips: list[mx.array], temb: mx.array, context: mx.array,
                 upsample_size: tuple[int, int] | None, num_frames: int | None = None, start: int = 0,
                 stop: int | None = None) -> mx.array:
        """Layers ``start`` to ``stop`` (default: all), then the upsampler if the last one ran."""
        stop = len(self.resnets) if stop is None else stop
        for j in range(start, stop):
            x = self.layer(j, mx.concatenate([x, skips.pop()], axis=-1), temb, context, num_frames)
        if "upsamplers" in self and stop == len(self.resnets):
            x = self.upsamplers[0](x, upsample_size)
        return x


class UNetMidBlock2DCrossAttn(LayeredBlock):
    """UNetMidBlock2DCrossAttn (UNet3D: UNetMidBlock3DCrossAttn)."""

    def __init__(self, plan: MidBlockPlan) -> None:
        super().__init__(plan, 1)

    def __call__(self, x: mx.array, temb: mx.array, context: mx.array, num_frames: int | None = None) -> mx.array:
        return self.layer(1, self.layer(0, x, temb, context, num_frames), temb, context, num_frames)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_2(silu(self.linear_1(x)))


class ConditionalUNet(nn.Module):
    """The UNet both UNet2DConditionModel and UNet3DConditionModel are, built from a topology plan."""

    motion: MotionConfig | None = None  # an AnimateDiff adapter's config, on motion UNets

    def build(self, plan: UNetPlan) -> None:
        self.plan = plan
        c0 = plan.base_channels
        self.conv_in = nn.Conv2d(plan.in_channels, c0, 3, padding=1)
        self.time_embedding = TimestepEmbedding(c0, plan.temb_channels)
        if plan.text_time is not None:
            self.add_embedding = TimestepEmbedding(plan.text_time.in_dim, plan.temb_channels)
        if plan.transformer_in is not None:
            self.transformer_in = TemporalTransformer(plan.transformer_in)
        self.down_blocks = [DownBlock(block) for block in plan.down_blocks]
        if plan.mid_block is not None:
            self.mid_block = UNetMidBlock2DCrossAttn(plan.mid_block)
        self.up_blocks = [UpBlock(block) for block in plan.up_blocks]
        self.conv_norm_out = group_norm(plan.groups, c0, plan.eps)
        self.conv_out = nn.Conv2d(c0, plan.out_channels, 3, padding=1)

    def frames(self, num_frames: int | None) -> int | None:
        """The frame count the temporal layers see (None: no temporal mixing)."""
        if num_frames is not None and self.motion is None:
            raise ValueError("num_frames needs a UNet built with a motion adapter")
        return num_frames

    def __call__(self, sample: mx.array, timestep: mx.array, encoder_hidden_states: mx.array,
                 num_frames: int | None = None, down_block_additional_residuals: Sequence[mx.array] | None = None,
                 mid_block_additional_residual: mx.array | None = None,
                 added_cond_kwargs: dict[str, mx.array] | None = None,
                 ip_hidden_states: mx.array | None = None,
                 deep_cache: FeatureSlot | None = None) -> mx.array:
        """``sample`` NHWC; ``timestep`` a scalar or (B,) training-time value; context (B, L, D).

        With ``num_frames`` (motion UNets, UNet3D), the batch holds B/F videos of F frames each,
        frame-minor, and the temporal layers mix information across each video's frames. The additional
        residuals (a ControlNet's, NHWC) are added to the skip states in order and to the mid block's output.
        ``added_cond_kwargs`` (SDXL, ``text_time`` UNets): ``text_embeds`` (B, D) and ``time_ids`` (B, n).
        ``deep_cache`` (mlx_stablefused.deep_cache): keep the deep features of this call, or run only the layers
        shallower than its branch from the features kept before.
        """
        f = self.frames(num_frames)
        down_res, mid_res = down_block_additional_residuals, mid_block_additional_residual
        self.plan.check_residuals(None if down_res is None else [r.shape[-1] for r in down_res],
                                  None if mid_res is None else mid_res.shape[-1])
        b = sample.shape[0]
        t = mx.broadcast_to(mx.array(timestep).reshape(-1), (b,))
        t_emb = timestep_embedding(t, self.plan.base_channels, self.plan.flip_sin_to_cos,
                                   self.plan.freq_shift).astype(sample.dtype)
        temb = self.time_embedding(t_emb)
        if "add_embedding" in self:
            temb = temb + self.add_embedding(self.text_time_embedding(added_cond_kwargs, b, temb.dtype))
        x = self.conv_in(sample)
        if "transformer_in" in self:
            x = self.transformer_in(x, f)
        # IP-Adapter image tokens ride beside the text to every attn2 (decoupled cross-attention).
        context = encoder_hidden_states if ip_hidden_states is None else (encoder_hidden_states, ip_hidden_states)
        shallow = deep_cache is not None and deep_cache.reuses
        x, skips = self.down_path(x, temb, context, f, deep_cache.branch + 1 if shallow else None)
        if down_res is not None:
            skips = [s + r for s, r in zip(skips, down_res)]
        layers = len(self.plan.skip_channels)
        branch_layer = layers - 1 - deep_cache.branch if deep_cache is not None else 0  # the up layer taking it
        if shallow:  # DeepCache: the features kept by a full call replace the mid block and the deeper up layers
            x = deep_cache.feature
        else:
            if "mid_block" in self:
                x = self.mid_block(x, temb, context, f)
            if mid_res is not None:
                x = x + mid_res
            x = self.up_layers(x, skips, temb, context, f, 0, branch_layer)
            if deep_cache is not None:
                deep_cache.keep(x)
        x = self.up_layers(x, skips, temb, context, f, branch_layer, layers)
        return self.conv_out(silu(self.conv_norm_out(x)))

    def down_path(self, x: mx.array, temb: mx.array, context: mx.array, f: int | None,
                  states_wanted: int | None = None) -> tuple[mx.array, list[mx.array]]:
        """The down blocks from conv_in's output ``x``: the last output and the skip states, conv_in's first
        (only the first ``states_wanted`` of them: DeepCache's shallow calls)."""
        skips = [x]
        for block in self.down_blocks:
            if states_wanted is not None and len(skips) == states_wanted:
                break
            x, states = block(x, temb, context, f, None if states_wanted is None else states_wanted - len(skips))
            skips.extend(states)
        return x, skips

    def up_layers(self, x: mx.array, skips: list[mx.array], temb: mx.array, context: mx.array, f: int | None,
                  start: int, stop: int) -> mx.array:
        """Up layers ``start`` to ``stop``, counted over all up blocks, each taking (popping) the last of
        ``skips``; a block's upsampler runs after its last layer."""
        first = 0  # the index of the block's first layer
        for block in self.up_blocks:
            n = len(block.resnets)
            lo, hi = max(start - first, 0), min(stop - first, n)
            first += n
            if lo >= hi:
                continue
            own = skips[len(skips) - (hi - lo):]
            del skips[len(skips) - (hi - lo):]
            # Upsample to the next skip's size: exactly 2x normally, the odd size when the input was odd.
            size = (skips[-1].shape[1], skips[-1].shape[2]) if skips else None
            x = block(x, own, temb, context, size, f, lo, hi)
        return x

    def text_time_embedding(self, added: dict[str, mx.array] | None, batch: int, dtype: mx.Dtype) -> mx.array:
        """``[text_embeds, sinusoidal(time_ids)]``, diffusers' ``text_time`` input to ``add_embedding``."""
        plan = self.plan.text_time
        if not added or "text_embeds" not in added or "time_ids" not in added:
            raise ValueError("this UNet has addition_embed_type='text_time' (SDXL): pass added_cond_kwargs with "
                             "text_embeds and time_ids")
        text, ids = added["text_embeds"], added["time_ids"]
        if text.ndim != 2 or ids.ndim != 2 or text.shape[0] != batch or ids.shape[0] != batch:
            raise ValueError(f"text_embeds {tuple(text.shape)} and time_ids {tuple(ids.shape)} must be (B, D) and "
                             f"(B, n) for a batch of {batch}")
        plan.check_inputs(text.shape[1], ids.shape[1])
        time = timestep_embedding(ids.reshape(-1), plan.time_proj_dim, self.plan.flip_sin_to_cos, self.plan.freq_shift)
        return mx.concatenate([text, time.reshape(batch, -1).astype(text.dtype)], axis=-1).astype(dtype)


class UNet2DConditionModel(ConditionalUNet):
    """SD's UNet; with ``motion`` (an AnimateDiff adapter config) it is diffusers' UNetMotionModel."""

    def __init__(self, config: UNetConfig, motion: MotionConfig | None = None) -> None:
        super().__init__()
        self.config = config
        self.motion = motion
        self.build(unet_plan(config, motion))
