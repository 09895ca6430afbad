"""UNet2DConditionModel (SD 1.x / 2.x, AnimateDiff's motion UNet) in PyTorch, and the blocks and forward it
shares with UNet3DConditionModel, built from a topology plan (mlx_stablefused.topology)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...config import MotionConfig, UNetConfig
from ...deep_cache import FeatureSlot
from ...token_merging import NO_TOKEN_MERGE
from ...topology import AttentionPlan, DownBlockPlan, MidBlockPlan, UNetPlan, UpBlockPlan, unet_plan
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

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        attn, cross, mlp = self.token_merge(x)  # identities unless token merging is on
        x = x + attn.unmerge(self.attn1(attn.merge(self.norm1(x))))
        x = x + cross.unmerge(self.attn2(cross.merge(self.norm2(x)), context))
        return x + mlp.unmerge(self.ff(mlp.merge(self.norm3(x))))


class Transformer2DModel(nn.Module):
    """Spatial transformer: SD 2.x projects with Linear layers, SD 1.x with 1x1 convolutions."""

    def __init__(self, plan: AttentionPlan) -> None:
        super().__init__()
        channels = plan.channels
        self.norm = group_norm(plan.groups, channels, 1e-6)
        self.linear_projection = plan.linear_projection
        proj = (lambda: nn.Linear(channels, channels)) if plan.linear_projection else (
            lambda: nn.Conv2d(channels, channels, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(plan) for _ in range(plan.layers)])
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


class LayeredBlock(nn.Module):
    """What down, mid and up blocks share: resnets, each followed by what the plan puts on it, in
    diffusers' order: a temporal convolution (UNet3D), spatial attention, temporal attention (UNet3D),
    a motion module (AnimateDiff; run only when frames are given)."""

    def __init__(self, plan: DownBlockPlan | MidBlockPlan | UpBlockPlan, carriers: int) -> None:
        """``carriers``: how many resnets carry attention (all but the mid block's last)."""
        super().__init__()

        def per_layer(make, plan_part, count: int = carriers) -> nn.ModuleList | None:
            return nn.ModuleList([make(plan_part) for _ in range(count)]) if plan_part is not None else None

        self.resnets = nn.ModuleList([ResnetBlock2D(r) for r in plan.resnets])
        self.temp_convs = nn.ModuleList([TemporalConvLayer(r.out_channels, r.groups) for r in plan.resnets]) \
            if plan.temporal_conv else None
        self.attentions = per_layer(Transformer2DModel, plan.attention)
        self.temp_attentions = per_layer(TemporalTransformer, plan.temporal_attention)
        self.motion_modules = per_layer(TemporalTransformer, plan.motion)
        self.carriers = carriers

    def layer(self, j: int, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor,
              num_frames: int | None) -> torch.Tensor:
        x = self.resnets[j](x, temb)
        if self.temp_convs is not None:
            x = self.temp_convs[j](x, num_frames)
        if j < self.carriers:
            if self.attentions is not None:
                x = self.attentions[j](x, context)
            if self.temp_attentions is not None:
                x = self.temp_attentions[j](x, num_frames)
            if num_frames is not None and self.motion_modules is not None:
                x = self.motion_modules[j](x, num_frames)
        return x


class DownBlock(LayeredBlock):
    def __init__(self, plan: DownBlockPlan) -> None:
        super().__init__(plan, len(plan.resnets))
        self.downsamplers = nn.ModuleList([Downsample2D(plan.out_channels, plan.downsample_padding)]) \
            if plan.downsample else None

    def forward(self, x, temb, context, num_frames=None, states_wanted: int | None = None):
        """``states_wanted``: stop after making that many skip states (DeepCache's shallow calls; None: all)."""
        states = []
        for j in range(len(self.resnets)):
            if states_wanted is not None and len(states) == states_wanted:
                return x, states
            x = self.layer(j, x, temb, context, num_frames)
            states.append(x)
        if self.downsamplers is not None and states_wanted != len(states):
            x = self.downsamplers[0](x)
            states.append(x)
        return x, states


class UpBlock(LayeredBlock):
    def __init__(self, plan: UpBlockPlan) -> None:
        super().__init__(plan, len(plan.resnets))
        self.upsamplers = nn.ModuleList([Upsample2D(plan.out_channels)]) if plan.upsample else None

    def forward(self, x, skips, temb, context, upsample_size, num_frames=None, start: int = 0,
                stop: int | None = None):
        """Layers ``start`` to ``stop`` (default: all), then the upsampler if the last one ran."""
        stop = len(self.resnets) if stop is None else stop
        for j in range(start, stop):
            x = self.layer(j, torch.cat([x, skips.pop()], dim=1), temb, context, num_frames)
        if self.upsamplers is not None and stop == len(self.resnets):
            x = self.upsamplers[0](x, upsample_size)
        return x


class UNetMidBlock2DCrossAttn(LayeredBlock):
    def __init__(self, plan: MidBlockPlan) -> None:
        super().__init__(plan, 1)

    def forward(self, x, temb, context, num_frames=None):
        return self.layer(1, self.layer(0, x, temb, context, num_frames), temb, context, num_frames)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


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
        self.transformer_in = TemporalTransformer(plan.transformer_in) if plan.transformer_in is not None else None
        self.down_blocks = nn.ModuleList([DownBlock(block) for block in plan.down_blocks])
        self.mid_block = UNetMidBlock2DCrossAttn(plan.mid_block) if plan.mid_block is not None else None
        self.up_blocks = nn.ModuleList([UpBlock(block) for block in plan.up_blocks])
        self.conv_norm_out = group_norm(plan.groups, c0, plan.eps)
        self.conv_out = nn.Conv2d(c0, plan.out_channels, 3, padding=1)

    def frames(self, num_frames: int | None) -> int | None:
        """The frame count the temporal layers see (None: no temporal mixing)."""
        if num_frames is not None and self.motion is None:
            raise ValueError("num_frames needs a UNet built with a motion adapter")
        return num_frames

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                num_frames: int | None = None, down_block_additional_residuals: Sequence[torch.Tensor] | None = None,
                mid_block_additional_residual: torch.Tensor | None = None,
                added_cond_kwargs: dict[str, torch.Tensor] | None = None,
                ip_hidden_states: torch.Tensor | None = None,
                deep_cache: FeatureSlot | None = None) -> torch.Tensor:
        """As diffusers' forward (NCHW); the additional residuals (a ControlNet's) are added to the skip
        states in order and to the mid block's output; ``added_cond_kwargs`` (SDXL, ``text_time`` UNets):
        ``text_embeds`` (B, D) and ``time_ids`` (B, n). ``deep_cache`` (mlx_stablefused.deep_cache): keep the
        deep features of this call, or run only the layers shallower than its branch from the features kept
        before."""
        f = self.frames(num_frames)
        down_res, mid_res = down_block_additional_residuals, mid_block_additional_residual
        self.plan.check_residuals(None if down_res is None else [r.shape[1] for r in down_res],
                                  None if mid_res is None else mid_res.shape[1])
        b = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(b)
        t_emb = timestep_embedding(t, self.plan.base_channels, self.plan.flip_sin_to_cos,
                                   self.plan.freq_shift).to(sample.dtype)
        temb = self.time_embedding(t_emb)
        if self.plan.text_time is not None:
            temb = temb + self.add_embedding(self.text_time_embedding(added_cond_kwargs, b, temb.dtype))
        x = self.conv_in(sample)
        if self.transformer_in is not None:
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
            if self.mid_block is not None:
                x = self.mid_block(x, temb, context, f)
            if mid_res is not None:
                x = x + mid_res
            x = self.up_layers(x, skips, temb, context, f, 0, branch_layer)
            if deep_cache is not None:
                deep_cache.keep(x)
        x = self.up_layers(x, skips, temb, context, f, branch_layer, layers)
        return self.conv_out(F.silu(self.conv_norm_out(x)))

    def down_path(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor, f: int | None,
                  states_wanted: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The down blocks from conv_in's output ``x``: the last output and the skip states, conv_in's first
        (only the first ``states_wanted`` of them: DeepCache's shallow calls)."""
        skips = [x]
        for block in self.down_blocks:
            if states_wanted is not None and len(skips) == states_wanted:
                break
            x, states = block(x, temb, context, f, None if states_wanted is None else states_wanted - len(skips))
            skips.extend(states)
        return x, skips

    def up_layers(self, x: torch.Tensor, skips: list[torch.Tensor], temb: torch.Tensor, context: torch.Tensor,
                  f: int | None, start: int, stop: int) -> torch.Tensor:
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
            size = tuple(skips[-1].shape[2:]) if skips else None
            x = block(x, own, temb, context, size, f, lo, hi)
        return x

    def text_time_embedding(self, added: dict[str, torch.Tensor] | None, batch: int,
                            dtype: torch.dtype) -> torch.Tensor:
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
        return torch.cat([text, time.reshape(batch, -1).to(text.dtype)], dim=-1).to(dtype)


class UNet2DConditionModel(ConditionalUNet):
    """SD's UNet; with ``motion`` (an AnimateDiff adapter config) it is diffusers' UNetMotionModel."""

    def __init__(self, config: UNetConfig, motion: MotionConfig | None = None) -> None:
        super().__init__()
        self.config = config
        self.motion = motion
        self.build(unet_plan(config, motion))
