"""The networks' topology, computed once from their configs and read by both backends.

Per block: the resnets' channels in and out (an up block's input is the previous output plus the
skip it takes), which layers carry spatial attention, AnimateDiff motion modules or ModelScope's
temporal layers, their heads and transformer layers, and where the resolution changes. This is
the arithmetic diffusers does in each model's ``__init__``, written once as frozen data; each
backend's constructors iterate a plan and its forwards stay idiomatic to the framework (no shared
ops layer). Odd configs are refused here, naming the field, before any module is built. This
module imports no framework.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

from .config import AutoencoderTinyConfig, ControlNetConfig, MotionConfig, UNet3DConfig, UNetConfig, VAEConfig
from .errors import UnsupportedModelError

VAE_EPS = 1e-6  # diffusers' AutoencoderKL norms, fixed whatever the config says


@dataclass(frozen=True)
class ResnetPlan:
    """One ResnetBlock2D; ``temb_channels`` None for the VAE's (no time embedding)."""

    in_channels: int
    out_channels: int
    temb_channels: int | None
    groups: int
    eps: float


@dataclass(frozen=True)
class AttentionPlan:
    """One spatial Transformer2DModel: ``layers`` BasicTransformerBlocks of ``heads`` x ``head_dim``,
    cross-attending to ``cross_attention_dim``-wide context. ``linear_projection`` picks torch's
    proj_in/proj_out (Linear or 1x1 Conv2d); MLX holds both as Linear (the layout contract)."""

    channels: int
    heads: int
    head_dim: int
    layers: int
    cross_attention_dim: int
    groups: int
    linear_projection: bool
    bias: bool
    upcast: bool


@dataclass(frozen=True)
class TemporalPlan:
    """One TemporalTransformer (attention across frames per pixel): an AnimateDiff motion module
    (sinusoidal positions up to ``max_seq_length``) or ModelScope's (``max_seq_length`` None)."""

    channels: int
    heads: int
    head_dim: int
    layers: int
    groups: int
    max_seq_length: int | None


class _ResnetStack:
    """A block's width is its last resnet's."""

    resnets: tuple[ResnetPlan, ...]

    @property
    def out_channels(self) -> int:
        return self.resnets[-1].out_channels


@dataclass(frozen=True)
class _LayerCarry:
    """What rides on each resnet of a block, in diffusers' attribute names."""

    temporal_conv: bool = False  # temp_convs.j (UNet3D), on every resnet: right after it
    attention: AttentionPlan | None = None  # attentions.j: after the resnet (and its temporal conv)
    temporal_attention: TemporalPlan | None = None  # temp_attentions.j (UNet3D): after the attention
    motion: TemporalPlan | None = None  # motion_modules.j (AnimateDiff): after the attention


@dataclass(frozen=True, kw_only=True)
class DownBlockPlan(_LayerCarry, _ResnetStack):
    """A down block: its resnets (each followed by what the carry names), then maybe a stride-2 conv."""

    index: int
    resnets: tuple[ResnetPlan, ...]
    downsample: bool
    downsample_padding: int

    @property
    def skip_channels(self) -> tuple[int, ...]:
        """Channels of the states this block leaves for the up path: one per layer, one after downsampling."""
        return (self.out_channels,) * (len(self.resnets) + self.downsample)


@dataclass(frozen=True, kw_only=True)
class MidBlockPlan(_LayerCarry):
    """UNetMidBlock2DCrossAttn / UNetMidBlock3DCrossAttn: resnet, attention (and the rest), resnet."""

    resnets: tuple[ResnetPlan, ...]

    @property
    def channels(self) -> int:
        return self.resnets[0].out_channels


@dataclass(frozen=True, kw_only=True)
class UpBlockPlan(_LayerCarry, _ResnetStack):
    """An up block; resnet j takes the previous output concatenated with the skip popped for it,
    so its ``in_channels`` is their sum. ``index`` counts from the lowest resolution, as diffusers."""

    index: int
    resnets: tuple[ResnetPlan, ...]
    skip_channels: tuple[int, ...]
    upsample: bool


@dataclass(frozen=True)
class TextTimePlan:
    """SDXL's ``addition_embed_type="text_time"``: each micro-conditioning id gets a ``time_proj_dim``-wide
    sinusoidal embedding (``add_time_proj``); those, after the pooled text embedding, go through
    ``add_embedding`` (linear_1 from ``in_dim``, SiLU, linear_2) and add to the time embedding."""

    time_proj_dim: int
    in_dim: int
    temb_channels: int

    def check_inputs(self, text_embeds_dim: int, time_ids_count: int) -> None:
        """Refuse pooled embeddings and time ids that do not make ``in_dim`` (diffusers' message, with numbers)."""
        got = text_embeds_dim + time_ids_count * self.time_proj_dim
        if got != self.in_dim:
            raise ValueError(f"the UNet's add_embedding takes {self.in_dim} features, but a pooled text embedding of "
                             f"{text_embeds_dim} and {time_ids_count} time ids x {self.time_proj_dim} make {got}")


@dataclass(frozen=True)
class UNetPlan:
    """A UNet2DConditionModel (optionally with motion modules) or a UNet3DConditionModel."""

    in_channels: int
    out_channels: int
    base_channels: int  # conv_in's output, the sinusoidal time embedding's width
    temb_channels: int
    flip_sin_to_cos: bool
    freq_shift: float
    groups: int
    eps: float
    down_blocks: tuple[DownBlockPlan, ...]
    mid_block: MidBlockPlan | None
    up_blocks: tuple[UpBlockPlan, ...]
    transformer_in: TemporalPlan | None = None  # UNet3D: temporal attention right after conv_in
    text_time: TextTimePlan | None = None  # SDXL: pooled text and time ids added to the time embedding

    @property
    def skip_channels(self) -> tuple[int, ...]:
        """Channels of every skip state in the order the down path makes them (conv_in's first): what
        ControlNet's ``down_block_additional_residuals`` must match one for one."""
        return (self.base_channels,) + tuple(c for block in self.down_blocks for c in block.skip_channels)

    def check_residuals(self, down_channels: list[int] | None, mid_channels: int | None) -> None:
        """Refuse ControlNet residuals that do not fit this UNet, before any work (``None``: not given)."""
        if (down_channels is None) != (mid_channels is None):
            raise ValueError("down_block_additional_residuals and mid_block_additional_residual go together "
                             "(as a ControlNet gives them); T2I-Adapter style down residuals alone are not supported")
        if down_channels is None:
            return
        if self.mid_block is None:
            raise ValueError("mid_block_additional_residual given but this UNet has no mid block")
        expected = list(self.skip_channels)
        if list(down_channels) != expected:
            raise ValueError(f"down_block_additional_residuals: expected {len(expected)} tensors with channels "
                             f"{expected}, got {len(down_channels)} with {list(down_channels)}")
        if mid_channels != self.mid_block.channels:
            raise ValueError(f"mid_block_additional_residual: expected {self.mid_block.channels} channels, "
                             f"got {mid_channels}")


@dataclass(frozen=True)
class VAEBlockPlan(_ResnetStack):
    """An encoder (DownEncoderBlock2D) or decoder (UpDecoderBlock2D) block: resnets, then maybe a
    resampler (the encoder's stride-2 conv with right/bottom padding, the decoder's 2x upsampler)."""

    index: int
    resnets: tuple[ResnetPlan, ...]
    resample: bool


@dataclass(frozen=True)
class VAEMidBlockPlan:
    """UNetMidBlock2D: two resnets with one-head self-attention between them when ``attention``."""

    resnets: tuple[ResnetPlan, ...]
    attention: bool

    @property
    def channels(self) -> int:
        return self.resnets[0].out_channels

    @property
    def groups(self) -> int:
        return self.resnets[0].groups


@dataclass(frozen=True)
class CoderPlan:
    """The VAE's encoder or decoder: conv_in, blocks and mid block (in the order they run), norm, conv_out."""

    conv_in: tuple[int, int]
    blocks: tuple[VAEBlockPlan, ...]
    mid_block: VAEMidBlockPlan
    conv_out: tuple[int, int]
    groups: int
    upsamples: bool = False  # the decoder: each resampling block doubles the size (the encoder's halves it)

    def largest_map(self, height: int, width: int) -> int:
        """The most elements of any one sample's feature map in a pass over a ``height`` x ``width`` input
        (the decoder: latent pixels): what the run-ahead bound of a VAE pass scales with (cpu_memory)."""
        h, w = height, width
        maps = [h * w * max(self.conv_in)]
        if self.upsamples:  # the decoder's mid block runs before its blocks, the encoder's after them
            maps.append(h * w * self.mid_block.channels)
        for block in self.blocks:
            maps.append(h * w * max(max(r.in_channels, r.out_channels) for r in block.resnets))
            if block.resample:
                channels = block.resnets[-1].out_channels
                if self.upsamples:  # 2x nearest
                    h, w = 2 * h, 2 * w
                else:  # stride 2 after a row and a column of padding (the padded map is one too)
                    maps.append((h + 1) * (w + 1) * channels)
                    h, w = (h - 2) // 2 + 1, (w - 2) // 2 + 1
                maps.append(h * w * channels)
        if not self.upsamples:
            maps.append(h * w * self.mid_block.channels)
        return max(*maps, h * w * max(self.conv_out))


@dataclass(frozen=True)
class VAEPlan:
    encoder: CoderPlan
    decoder: CoderPlan
    latent_channels: int
    quant_conv: bool  # 1x1 convs around the latent
    post_quant_conv: bool


def _require_positive(component: str, field: str, values: tuple[int, ...]) -> None:
    """Refuse counts diffusers would build into an empty block (or a shape error at run time)."""
    if any(v < 1 for v in values):
        raise UnsupportedModelError(f"{component} config: {field}={list(values)} needs every entry >= 1")


def _down_blocks(channels: tuple[int, ...], layers: tuple[int, ...], resnet: Callable[[int, int], ResnetPlan],
                 carry: Callable[[int, int], _LayerCarry], padding: int) -> tuple[DownBlockPlan, ...]:
    """diffusers' down path: block i's first resnet takes the previous block's width; all but the last
    block end in a downsampler."""
    blocks, in_ch = [], channels[0]
    for i, out in enumerate(channels):
        resnets = tuple(resnet(in_ch if j == 0 else out, out) for j in range(layers[i]))
        blocks.append(DownBlockPlan(**vars(carry(i, out)), index=i, resnets=resnets,
                                    downsample=i < len(channels) - 1, downsample_padding=padding))
        in_ch = out
    return tuple(blocks)


def _up_blocks(channels: tuple[int, ...], layers: tuple[int, ...], resnet: Callable[[int, int], ResnetPlan],
               carry: Callable[[int, int, int], _LayerCarry]) -> tuple[UpBlockPlan, ...]:
    """diffusers' up path: up block i works at level n-1-i with one resnet more than its down block;
    each resnet's skip has the block's width but the last, which has the next-finer level's."""
    n = len(channels)
    blocks, prev = [], channels[-1]
    for i in range(n):
        level = n - 1 - i
        out, count = channels[level], layers[level] + 1
        skips = tuple(channels[max(level - 1, 0)] if j == count - 1 else out for j in range(count))
        resnets = tuple(resnet((prev if j == 0 else out) + skip, out) for j, skip in enumerate(skips))
        blocks.append(UpBlockPlan(**vars(carry(i, level, out)), index=i, resnets=resnets, skip_channels=skips,
                                  upsample=i < n - 1))
        prev = out
    return tuple(blocks)


def _motion_plan(motion: MotionConfig, groups: int, channels: int, heads: int, layers: int) -> TemporalPlan:
    """A motion module; its GroupNorm takes the UNet's group count, as diffusers' UNetMotionModel."""
    if channels % heads:
        raise UnsupportedModelError(f"motion adapter config: {channels} channels are not divisible into {heads} "
                                    "heads (motion_num_attention_heads)")
    return TemporalPlan(channels, heads, channels // heads, layers, groups, motion.max_seq_length)


def unet_plan(config: UNetConfig, motion: MotionConfig | None = None) -> UNetPlan:
    """The plan of diffusers' UNet2DConditionModel; with ``motion``, of its UNetMotionModel (AnimateDiff)."""
    _require_positive("UNet", "layers_per_block", config.layers_per_block)
    _require_positive("UNet", "transformer_layers_per_block", config.transformer_layers_per_block)
    if motion is not None:
        motion.check_fits(config)
        _require_positive("motion adapter", "motion_transformer_layers_per_block", motion.transformer_layers_per_block)
    ch, groups = config.block_out_channels, config.norm_num_groups
    temb = 4 * ch[0]
    resnet = partial(ResnetPlan, temb_channels=temb, groups=groups, eps=config.norm_eps)

    def attention(level: int, channels: int) -> AttentionPlan:
        heads = config.num_attention_heads[level]
        return AttentionPlan(channels, heads, channels // heads, config.transformer_layers_per_block[level],
                             config.cross_attention_dim, groups, config.use_linear_projection,
                             config.attention_bias, config.upcast_attention)

    def motion_module(level: int, channels: int) -> TemporalPlan | None:
        if motion is None:
            return None
        return _motion_plan(motion, groups, channels, motion.num_attention_heads[level],
                            motion.transformer_layers_per_block[level])

    def down_carry(i: int, out: int) -> _LayerCarry:
        cross = config.down_block_types[i] == "CrossAttnDownBlock2D"
        return _LayerCarry(attention=attention(i, out) if cross else None, motion=motion_module(i, out))

    def up_carry(i: int, level: int, out: int) -> _LayerCarry:
        cross = config.up_block_types[i] == "CrossAttnUpBlock2D"
        return _LayerCarry(attention=attention(level, out) if cross else None, motion=motion_module(level, out))

    mid = None
    if config.mid_block_type is not None:
        c = ch[-1]
        mid_motion = None
        if motion is not None and motion.use_mid_block:
            mid_motion = _motion_plan(motion, groups, c, motion.num_attention_heads[-1], motion.mid_transformer_layers)
        mid = MidBlockPlan(attention=attention(len(ch) - 1, c), motion=mid_motion,
                           resnets=(resnet(c, c), resnet(c, c)))
    text_time = None
    if config.addition_embed_type == "text_time":
        text_time = TextTimePlan(config.addition_time_embed_dim, config.projection_class_embeddings_input_dim, temb)
    return UNetPlan(
        in_channels=config.in_channels, out_channels=config.out_channels, base_channels=ch[0], temb_channels=temb,
        flip_sin_to_cos=config.flip_sin_to_cos, freq_shift=config.freq_shift, groups=groups, eps=config.norm_eps,
        down_blocks=_down_blocks(ch, config.layers_per_block, resnet, down_carry, config.downsample_padding),
        mid_block=mid, up_blocks=_up_blocks(ch, config.layers_per_block, resnet, up_carry), text_time=text_time)


def unet3d_plan(config: UNet3DConfig) -> UNetPlan:
    """The plan of diffusers' UNet3DConditionModel: every resnet followed by a temporal convolution,
    every spatial transformer (one layer, linear projections, channels // head_dim heads) by a
    temporal one."""
    _require_positive("UNet3D", "layers_per_block", (config.layers_per_block,))
    ch, groups = config.block_out_channels, config.norm_num_groups
    temb = 4 * ch[0]
    resnet = partial(ResnetPlan, temb_channels=temb, groups=groups, eps=config.norm_eps)

    def carry(level: int, channels: int, cross: bool) -> _LayerCarry:
        if not cross:
            return _LayerCarry(temporal_conv=True)
        d = config.attention_head_dim[level]
        return _LayerCarry(
            attention=AttentionPlan(channels, channels // d, d, 1, config.cross_attention_dim, groups,
                                    linear_projection=True, bias=False, upcast=False),
            temporal_conv=True, temporal_attention=TemporalPlan(channels, channels // d, d, 1, groups, None))

    n = len(ch)
    layers = (config.layers_per_block,) * n
    c = ch[-1]
    return UNetPlan(
        in_channels=config.in_channels, out_channels=config.out_channels, base_channels=ch[0], temb_channels=temb,
        flip_sin_to_cos=True, freq_shift=0, groups=groups, eps=config.norm_eps,
        transformer_in=TemporalPlan(ch[0], 8, config.attention_head_dim[0], 1, groups, None),
        down_blocks=_down_blocks(
            ch, layers, resnet, lambda i, out: carry(i, out, config.down_block_types[i] == "CrossAttnDownBlock3D"),
            config.downsample_padding),
        mid_block=MidBlockPlan(**vars(carry(n - 1, c, True)), resnets=(resnet(c, c), resnet(c, c))),
        up_blocks=_up_blocks(ch, layers, resnet,
                             lambda i, level, out: carry(level, out, config.up_block_types[i] == "CrossAttnUpBlock3D")))


def vae_plan(config: VAEConfig) -> VAEPlan:
    """The plan of diffusers' AutoencoderKL: the decoder mirrors the encoder with one resnet more per block."""
    _require_positive("VAE", "layers_per_block", (config.layers_per_block,))
    ch, groups = config.block_out_channels, config.norm_num_groups
    resnet = partial(ResnetPlan, temb_channels=None, groups=groups, eps=VAE_EPS)

    def blocks(widths: tuple[int, ...], layers: int) -> tuple[VAEBlockPlan, ...]:
        """Block i's first resnet takes the previous block's width; all but the last block resample."""
        return tuple(VAEBlockPlan(i, tuple(resnet(widths[max(i - 1, 0)] if j == 0 else out, out)
                                           for j in range(layers)), resample=i < len(widths) - 1)
                     for i, out in enumerate(widths))

    def mid(c: int) -> VAEMidBlockPlan:
        return VAEMidBlockPlan((resnet(c, c), resnet(c, c)), config.mid_block_add_attention)

    rev = ch[::-1]
    return VAEPlan(
        encoder=CoderPlan((config.in_channels, ch[0]), blocks(ch, config.layers_per_block), mid(ch[-1]),
                          (ch[-1], 2 * config.latent_channels), groups),
        decoder=CoderPlan((config.latent_channels, rev[0]), blocks(rev, config.layers_per_block + 1), mid(rev[0]),
                          (rev[-1], config.out_channels), groups, upsamples=True),
        latent_channels=config.latent_channels, quant_conv=config.use_quant_conv,
        post_quant_conv=config.use_post_quant_conv)


@dataclass(frozen=True)
class TinyLayer:
    """One entry of diffusers' ``EncoderTiny`` / ``DecoderTiny`` ``layers`` Sequential (its index is the
    parameter prefix): a 3x3 ``conv`` (``stride``, ``bias``), a residual ``block`` (AutoencoderTinyBlock:
    three 3x3 convolutions with ReLU between, identity skip, ReLU after the sum), ``relu``, or nearest
    ``upsample`` by ``scale``."""

    kind: str
    in_channels: int = 0
    out_channels: int = 0
    stride: int = 1
    bias: bool = True
    scale: int = 1


@dataclass(frozen=True)
class TinyAutoencoderPlan:
    encoder: tuple[TinyLayer, ...]
    decoder: tuple[TinyLayer, ...]


def tiny_autoencoder_plan(config: AutoencoderTinyConfig) -> TinyAutoencoderPlan:
    """TAESD's two layer lists, in diffusers' order: encoder conv (stride 2 after the first stage) + blocks per
    stage, then a conv to the latent; decoder conv + ReLU, then per stage blocks, upsample and a conv."""
    encoder: list[TinyLayer] = []
    for i, (width, blocks) in enumerate(zip(config.encoder_block_out_channels, config.num_encoder_blocks)):
        encoder.append(TinyLayer("conv", config.in_channels, width) if i == 0
                       else TinyLayer("conv", width, width, stride=2, bias=False))
        encoder += [TinyLayer("block", width, width)] * blocks
    encoder.append(TinyLayer("conv", config.encoder_block_out_channels[-1], config.latent_channels))

    widths = config.decoder_block_out_channels
    decoder = [TinyLayer("conv", config.latent_channels, widths[0]), TinyLayer("relu")]
    last = len(widths) - 1
    for i, (width, blocks) in enumerate(zip(widths, config.num_decoder_blocks)):
        decoder += [TinyLayer("block", width, width)] * blocks
        if i != last:
            decoder.append(TinyLayer("upsample", scale=config.upsampling_scaling_factor))
        decoder.append(TinyLayer("conv", width, config.out_channels if i == last else width, bias=i == last))
    return TinyAutoencoderPlan(tuple(encoder), tuple(decoder))


@dataclass(frozen=True)
class ConditioningEmbeddingPlan:
    """ControlNetConditioningEmbedding: ``conv_in`` (image channels -> widths[0]), then per step a 3x3 conv at
    the same width and a stride-2 3x3 conv to the next width (SiLU after each), ``conv_out`` to the UNet width."""

    in_channels: int
    widths: tuple[int, ...]
    out_channels: int

    @property
    def blocks(self) -> tuple[tuple[int, int, int], ...]:
        """(in, out, stride) of each entry of diffusers' ``blocks`` list, in order."""
        out = []
        for a, b in zip(self.widths, self.widths[1:]):
            out += [(a, a, 1), (a, b, 2)]
        return tuple(out)


@dataclass(frozen=True)
class ControlNetPlan:
    """A ControlNetModel: the UNet encoder's plan (``encoder``; its up blocks are not built), the conditioning
    embedding, and one zero conv per skip state (``skip_channels``) plus one on the mid block."""

    encoder: UNetPlan
    embedding: ConditioningEmbeddingPlan
    global_pool: bool
    bgr: bool

    @property
    def skip_channels(self) -> tuple[int, ...]:
        return self.encoder.skip_channels

    @property
    def mid_channels(self) -> int:
        return self.encoder.mid_block.channels

    def residual_scales(self, scale: float, guess_mode: bool) -> list[float]:
        """The factor on each residual (the mid block's last): ``scale``, or in guess mode (unless the
        ControlNet pools its outputs) diffusers' ``logspace(-1, 0)`` ramp times ``scale``."""
        n = len(self.skip_channels) + 1
        if not guess_mode or self.global_pool:
            return [float(scale)] * n
        return [float(scale) * 10.0 ** (-1.0 + i / (n - 1)) for i in range(n)]

    def check_fits(self, unet: UNetPlan, cross_attention_dim: int, unet_cross_attention_dim: int,
                   latent_channels: int, vae_factor: int, factor: int, name: str) -> None:
        """Refuse a ControlNet made for another base model, before any work, naming what differs."""
        if cross_attention_dim != unet_cross_attention_dim:
            raise UnsupportedModelError(
                f"ControlNet {name} attends to {cross_attention_dim}-wide text states but this model's UNet to "
                f"{unet_cross_attention_dim} (cross_attention_dim): it was made for another base model "
                "(SD 1.x: 768, SD 2.x: 1024, SDXL: 2048)")
        if list(self.skip_channels) != list(unet.skip_channels) or unet.mid_block is None \
                or self.mid_channels != unet.mid_block.channels:
            raise UnsupportedModelError(
                f"ControlNet {name} gives residuals of channels {list(self.skip_channels)} (mid {self.mid_channels}) "
                f"but this model's UNet takes {list(unet.skip_channels)} (mid "
                f"{None if unet.mid_block is None else unet.mid_block.channels}): it was made for another base model")
        if self.encoder.in_channels != latent_channels:
            raise UnsupportedModelError(f"ControlNet {name} takes {self.encoder.in_channels}-channel latents (in_channels) "
                                        f"but this model's VAE makes {latent_channels}")
        mine, theirs = self.encoder.text_time, unet.text_time
        if (mine is None) != (theirs is None) or (mine is not None and (mine.in_dim, mine.time_proj_dim)
                                                  != (theirs.in_dim, theirs.time_proj_dim)):
            raise UnsupportedModelError(
                f"ControlNet {name} has addition_embed_type={'text_time' if mine else None!r} "
                f"({mine.in_dim if mine else 0} features) but this model's UNet "
                f"{'text_time' if theirs else None!r} ({theirs.in_dim if theirs else 0}): an SDXL ControlNet "
                "needs an SDXL model and an SD 1.x / 2.x one an SD 1.x / 2.x model")
        if factor != vae_factor:
            raise UnsupportedModelError(f"ControlNet {name} embeds control images at 1/{factor} scale "
                                        f"(conditioning_embedding_out_channels) but this model's latents are 1/{vae_factor}")


def controlnet_plan(config: ControlNetConfig) -> ControlNetPlan:
    """The plan of diffusers' ControlNetModel, from the UNet plan of its encoder."""
    encoder = unet_plan(config.encoder)
    if encoder.mid_block is None:
        raise UnsupportedModelError("ControlNet config: a ControlNet needs its mid block (mid_block_type)")
    embedding = ConditioningEmbeddingPlan(config.conditioning_channels, tuple(config.conditioning_embedding_out_channels),
                                          encoder.base_channels)
    return ControlNetPlan(encoder, embedding, config.global_pool_conditions, config.channel_order == "bgr")
