"""Model configurations parsed from diffusers / transformers ``config.json`` files.

Every field that changes the architecture is read from the file; fields that ask
for features this port does not implement raise ``UnsupportedModelError`` naming
the field, so an unsupported checkpoint is refused instead of loaded wrongly.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from .errors import UnsupportedModelError


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise
    except json.JSONDecodeError as e:
        raise UnsupportedModelError(f"{path} is not valid JSON: {e}") from e


def _per_block(value: Any, n: int, name: str) -> tuple:
    """diffusers lets many UNet fields be a scalar or one value per block."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise UnsupportedModelError(f"{name} has {len(value)} entries for {n} blocks")
        return tuple(value)
    return (value,) * n


def _require(cfg: dict, key: str, allowed: Sequence[Any], component: str) -> None:
    if key in cfg and cfg[key] not in allowed:
        raise UnsupportedModelError(
            f"{component} config: {key}={cfg[key]!r} is not supported (supported: {list(allowed)})"
        )


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    projection_dim: int = 512  # CLIPTextModelWithProjection's text_projection width (SDXL's second encoder)

    @classmethod
    def from_dict(cls, cfg: dict) -> "CLIPTextConfig":
        _require(cfg, "hidden_act", ("quick_gelu", "gelu"), "text encoder")
        known = {k: cfg[k] for k in cls.__dataclass_fields__ if k in cfg}
        return cls(**known)

    def to_dict(self) -> dict:
        return asdict(self)



@dataclass(frozen=True)
class CLIPVisionConfig:
    """transformers' CLIPVisionConfig (an IP-Adapter's image encoder: ViT-H/14, ViT-bigG/14)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512  # visual_projection's width: the image embedding an IP-Adapter projects
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, cfg: dict) -> "CLIPVisionConfig":
        if "vision_config" in cfg:  # a full CLIPModel config: its vision half
            cfg = cfg["vision_config"]
        _require(cfg, "hidden_act", ("quick_gelu", "gelu"), "image encoder")
        known = {k: cfg[k] for k in cls.__dataclass_fields__ if k in cfg}
        config = cls(**known)
        if config.image_size % config.patch_size:
            raise UnsupportedModelError(f"image encoder config: image_size={config.image_size} is not a multiple "
                                        f"of patch_size={config.patch_size}")
        return config

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1  # the patches and the class token

    def to_dict(self) -> dict:
        return asdict(self)

_UNET_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
_UNET_UP = ("CrossAttnUpBlock2D", "UpBlock2D")


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple = (320, 640, 1280, 1280)
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: tuple = (2, 2, 2, 2)
    num_attention_heads: tuple = (8, 8, 8, 8)
    transformer_layers_per_block: tuple = (1, 1, 1, 1)
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    use_linear_projection: bool = False
    upcast_attention: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    downsample_padding: int = 1
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    attention_bias: bool = False
    sample_size: int | None = None
    # SDXL's added conditioning: pooled text + sinusoidal micro-conditioning ids through add_embedding.
    addition_embed_type: str | None = None  # None or "text_time"
    addition_time_embed_dim: int | None = None  # width of each time id's sinusoidal embedding
    projection_class_embeddings_input_dim: int | None = None  # add_embedding.linear_1's input width

    @classmethod
    def from_dict(cls, cfg: dict) -> "UNetConfig":
        c = "UNet"
        _require(cfg, "addition_embed_type", (None, "text_time"), c)
        text_time = cfg.get("addition_embed_type") == "text_time"
        if text_time:
            for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
                if not isinstance(cfg.get(key), int) or isinstance(cfg.get(key), bool) or cfg[key] < 1:
                    raise UnsupportedModelError(f"{c} config: addition_embed_type='text_time' needs a positive "
                                                f"integer {key}, got {cfg.get(key)!r}")
        for key in ("class_embed_type", "encoder_hid_dim_type", "time_cond_proj_dim",
                    "num_class_embeds", "time_embedding_dim", "time_embedding_act_fn", "timestep_post_act"):
            if cfg.get(key) is not None:
                raise UnsupportedModelError(f"{c} config: {key}={cfg[key]!r} is not supported (class-conditioned "
                                            "UNets are not implemented)")
        _require(cfg, "time_embedding_type", ("positional",), c)
        _require(cfg, "resnet_time_scale_shift", ("default",), c)
        _require(cfg, "act_fn", ("silu",), c)
        _require(cfg, "dual_cross_attention", (False,), c)
        _require(cfg, "only_cross_attention", (False,), c)
        _require(cfg, "center_input_sample", (False,), c)
        _require(cfg, "resnet_skip_time_act", (False,), c)
        _require(cfg, "resnet_out_scale_factor", (1.0, 1), c)
        _require(cfg, "mid_block_scale_factor", (1.0, 1), c)
        _require(cfg, "conv_in_kernel", (3,), c)
        _require(cfg, "conv_out_kernel", (3,), c)
        _require(cfg, "attention_type", ("default",), c)
        _require(cfg, "cross_attention_norm", (None,), c)
        _require(cfg, "mid_block_type", ("UNetMidBlock2DCrossAttn", None), c)
        down = tuple(cfg.get("down_block_types", cls.down_block_types))
        up = tuple(cfg.get("up_block_types", cls.up_block_types))
        for t in down:
            if t not in _UNET_DOWN:
                raise UnsupportedModelError(f"{c} config: down block type {t!r} is not supported ({_UNET_DOWN})")
        for t in up:
            if t not in _UNET_UP:
                raise UnsupportedModelError(f"{c} config: up block type {t!r} is not supported ({_UNET_UP})")
        if len(up) != len(down):
            raise UnsupportedModelError(f"{c} config: {len(down)} down blocks but {len(up)} up blocks")
        n = len(down)
        channels = tuple(cfg.get("block_out_channels", cls.block_out_channels))
        if len(channels) != n:
            raise UnsupportedModelError(f"{c} config: block_out_channels has {len(channels)} entries for {n} blocks")
        # diffusers' legacy naming: for SD 1.x/2.x `attention_head_dim` holds the number of heads.
        heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
        cross = cfg.get("cross_attention_dim", 768)
        if isinstance(cross, (list, tuple)):
            if len(set(cross)) != 1:
                raise UnsupportedModelError(f"{c} config: per-block cross_attention_dim {cross} is not supported")
            cross = cross[0]
        tlayers = cfg.get("transformer_layers_per_block", 1)
        if isinstance(tlayers, (list, tuple)) and any(isinstance(x, (list, tuple)) for x in tlayers):
            raise UnsupportedModelError(f"{c} config: nested transformer_layers_per_block is not supported")
        if cfg.get("reverse_transformer_layers_per_block") is not None:
            raise UnsupportedModelError(f"{c} config: reverse_transformer_layers_per_block is not supported")
        groups = cfg.get("norm_num_groups", 32)
        if groups is None:
            raise UnsupportedModelError(f"{c} config: norm_num_groups=None is not supported")
        for ch in channels:
            if ch % groups:
                raise UnsupportedModelError(f"{c} config: {ch} channels are not divisible into {groups} groups")
        head_counts = _per_block(heads, n, "attention_head_dim")
        for ch, h in zip(channels, head_counts):
            if ch % h:
                raise UnsupportedModelError(f"{c} config: {ch} channels are not divisible into {h} heads")
        return cls(
            in_channels=cfg.get("in_channels", 4),
            out_channels=cfg.get("out_channels", 4),
            block_out_channels=channels,
            down_block_types=down,
            up_block_types=up,
            layers_per_block=_per_block(cfg.get("layers_per_block", 2), n, "layers_per_block"),
            num_attention_heads=head_counts,
            transformer_layers_per_block=_per_block(tlayers, n, "transformer_layers_per_block"),
            cross_attention_dim=int(cross),
            norm_num_groups=groups,
            norm_eps=cfg.get("norm_eps", 1e-5),
            use_linear_projection=bool(cfg.get("use_linear_projection", False)),
            upcast_attention=bool(cfg.get("upcast_attention", False)),
            flip_sin_to_cos=bool(cfg.get("flip_sin_to_cos", True)),
            freq_shift=cfg.get("freq_shift", 0),
            downsample_padding=cfg.get("downsample_padding", 1),
            mid_block_type=cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn"),
            attention_bias=bool(cfg.get("attention_bias", False)),
            sample_size=cfg.get("sample_size"),
            addition_embed_type="text_time" if text_time else None,
            addition_time_embed_dim=cfg["addition_time_embed_dim"] if text_time else None,
            projection_class_embeddings_input_dim=cfg["projection_class_embeddings_input_dim"] if text_time else None,
        )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    force_upcast: bool = True
    sample_size: int = 32  # diffusers' default; SD repos say 512 (SD 2.x: 768). Sets the tiling tile size.

    @classmethod
    def from_dict(cls, cfg: dict) -> "VAEConfig":
        c = "VAE"
        _require(cfg, "act_fn", ("silu",), c)
        for t in cfg.get("down_block_types", ()):
            if t != "DownEncoderBlock2D":
                raise UnsupportedModelError(f"{c} config: down block type {t!r} is not supported")
        for t in cfg.get("up_block_types", ()):
            if t != "UpDecoderBlock2D":
                raise UnsupportedModelError(f"{c} config: up block type {t!r} is not supported")
        if cfg.get("latents_mean") is not None or cfg.get("latents_std") is not None:
            raise UnsupportedModelError(f"{c} config: latents_mean/latents_std normalisation is not supported")
        known = {k: cfg[k] for k in cls.__dataclass_fields__ if k in cfg}
        if isinstance(known.get("sample_size"), (list, tuple)):
            known["sample_size"] = int(known["sample_size"][0])
        if "block_out_channels" in known:
            known["block_out_channels"] = tuple(known["block_out_channels"])
        out = cls(**known)
        for ch in out.block_out_channels:
            if ch % out.norm_num_groups:
                raise UnsupportedModelError(f"{c} config: {ch} channels not divisible into {out.norm_num_groups} groups")
        return out

    @property
    def downscale_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class AutoencoderTinyConfig:
    """diffusers' ``AutoencoderTiny`` (TAESD, TAESDXL): plain 3x3 convolutions, ReLU, nearest upsampling."""

    in_channels: int = 3
    out_channels: int = 3
    encoder_block_out_channels: tuple = (64, 64, 64, 64)
    decoder_block_out_channels: tuple = (64, 64, 64, 64)
    latent_channels: int = 4
    upsampling_scaling_factor: int = 2
    num_encoder_blocks: tuple = (1, 3, 3, 3)
    num_decoder_blocks: tuple = (3, 3, 3, 1)
    scaling_factor: float = 1.0  # TAESD decodes the diffusion model's (already scaled) latents as they are
    shift_factor: float = 0.0

    @classmethod
    def from_dict(cls, cfg: dict) -> "AutoencoderTinyConfig":
        c = "AutoencoderTiny"
        _require(cfg, "act_fn", ("relu",), c)
        _require(cfg, "upsample_fn", ("nearest",), c)
        known = {k: cfg[k] for k in cls.__dataclass_fields__ if k in cfg}
        for key in ("encoder_block_out_channels", "decoder_block_out_channels", "num_encoder_blocks",
                    "num_decoder_blocks"):
            if key in known:
                known[key] = tuple(known[key])
        out = cls(**known)
        for channels, blocks, side in ((out.encoder_block_out_channels, out.num_encoder_blocks, "encoder"),
                                       (out.decoder_block_out_channels, out.num_decoder_blocks, "decoder")):
            if len(channels) != len(blocks) or not channels:
                raise UnsupportedModelError(f"{c} config: {side}_block_out_channels and num_{side}_blocks must "
                                            f"have one entry per stage, got {list(channels)} and {list(blocks)}")
            if len(set(channels)) != 1:  # diffusers' EncoderTiny / DecoderTiny keep one width throughout
                raise UnsupportedModelError(f"{c} config: {side}_block_out_channels={list(channels)} must all be "
                                            "equal (diffusers' tiny encoder and decoder keep one width)")
        if out.upsampling_scaling_factor < 1:
            raise UnsupportedModelError(f"{c} config: upsampling_scaling_factor={out.upsampling_scaling_factor}")
        return out

    @property
    def downscale_factor(self) -> int:
        return 2 ** (len(self.encoder_block_out_channels) - 1)


@dataclass(frozen=True)
class MotionConfig:
    """An AnimateDiff motion adapter (diffusers' MotionAdapter config.json, or inferred from a checkpoint)."""

    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: tuple = (2, 2, 2, 2)
    transformer_layers_per_block: tuple = (1, 1, 1, 1)
    num_attention_heads: tuple = (8, 8, 8, 8)
    max_seq_length: int = 32
    use_mid_block: bool = True
    mid_transformer_layers: int = 1

    @classmethod
    def from_dict(cls, cfg: dict) -> "MotionConfig":
        c = "motion adapter"
        channels = tuple(cfg.get("block_out_channels", cls.block_out_channels))
        n = len(channels)
        if cfg.get("conv_in_channels"):
            raise UnsupportedModelError(f"{c} config: conv_in_channels (PIA / SparseCtrl adapters) is not supported")
        tlayers = cfg.get("motion_transformer_layers_per_block", 1)
        if isinstance(tlayers, (list, tuple)) and any(isinstance(x, (list, tuple)) for x in tlayers):
            raise UnsupportedModelError(f"{c} config: nested motion_transformer_layers_per_block is not supported")
        mid = cfg.get("motion_transformer_layers_per_mid_block", 1)
        if isinstance(mid, (list, tuple)):
            if len(set(mid)) != 1:
                raise UnsupportedModelError(f"{c} config: per-layer motion_transformer_layers_per_mid_block")
            mid = mid[0]
        if cfg.get("motion_mid_block_layers_per_block", 1) != 1:
            raise UnsupportedModelError(f"{c} config: motion_mid_block_layers_per_block != 1 is not supported")
        return cls(
            block_out_channels=channels,
            layers_per_block=_per_block(cfg.get("motion_layers_per_block", 2), n, "motion_layers_per_block"),
            transformer_layers_per_block=_per_block(tlayers, n, "motion_transformer_layers_per_block"),
            num_attention_heads=_per_block(cfg.get("motion_num_attention_heads", 8), n, "motion_num_attention_heads"),
            max_seq_length=int(cfg.get("motion_max_seq_length", 32)),
            use_mid_block=bool(cfg.get("use_motion_mid_block", True)),
            mid_transformer_layers=int(mid),
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def check_fits(self, unet: UNetConfig) -> None:
        """Raise unless this adapter fits ``unet`` block for block (channels and layers)."""
        if tuple(self.block_out_channels) != tuple(unet.block_out_channels):
            raise UnsupportedModelError(f"motion adapter channels {list(self.block_out_channels)} do not match the "
                                        f"UNet's {list(unet.block_out_channels)}; it was made for another base model")
        if tuple(self.layers_per_block) != tuple(unet.layers_per_block):
            raise UnsupportedModelError(f"motion adapter has {list(self.layers_per_block)} layers per block but the "
                                        f"UNet has {list(unet.layers_per_block)}")
        if self.use_mid_block and unet.mid_block_type is None:
            raise UnsupportedModelError("motion adapter has a mid-block module but the UNet has no mid block")


_UNET3D_DOWN = ("CrossAttnDownBlock3D", "DownBlock3D")
_UNET3D_UP = ("CrossAttnUpBlock3D", "UpBlock3D")


@dataclass(frozen=True)
class UNet3DConfig:
    """diffusers' UNet3DConditionModel (ModelScope text-to-video, Zeroscope).

    ``attention_head_dim`` is a head *size* here: spatial and temporal attention use channels // it heads.
    """

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple = (320, 640, 1280, 1280)
    down_block_types: tuple = ("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",)
    up_block_types: tuple = ("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3
    layers_per_block: int = 2
    attention_head_dim: tuple = (64, 64, 64, 64)
    cross_attention_dim: int = 1024
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    downsample_padding: int = 1
    sample_size: int | None = None

    @classmethod
    def from_dict(cls, cfg: dict) -> "UNet3DConfig":
        c = "UNet3D"
        if cfg.get("time_cond_proj_dim") is not None:
            raise UnsupportedModelError(f"{c} config: time_cond_proj_dim is not supported")
        _require(cfg, "act_fn", ("silu",), c)
        _require(cfg, "mid_block_scale_factor", (1, 1.0), c)
        down = tuple(cfg.get("down_block_types", cls.down_block_types))
        up = tuple(cfg.get("up_block_types", cls.up_block_types))
        for t in down:
            if t not in _UNET3D_DOWN:
                raise UnsupportedModelError(f"{c} config: down block type {t!r} is not supported ({_UNET3D_DOWN})")
        for t in up:
            if t not in _UNET3D_UP:
                raise UnsupportedModelError(f"{c} config: up block type {t!r} is not supported ({_UNET3D_UP})")
        channels = tuple(cfg.get("block_out_channels", cls.block_out_channels))
        n = len(channels)
        if len(down) != n or len(up) != n:
            raise UnsupportedModelError(f"{c} config: {n} channel entries for {len(down)} down / {len(up)} up blocks")
        head_dim = _per_block(cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 64), n,
                              "attention_head_dim")
        groups = cfg.get("norm_num_groups", 32)
        for ch, d in zip(channels, head_dim):
            if ch % d or ch % groups:
                raise UnsupportedModelError(f"{c} config: {ch} channels do not split into {d}-wide heads "
                                            f"and {groups} groups")
        return cls(in_channels=cfg.get("in_channels", 4), out_channels=cfg.get("out_channels", 4),
                   block_out_channels=channels, down_block_types=down, up_block_types=up,
                   layers_per_block=int(cfg.get("layers_per_block", 2)), attention_head_dim=head_dim,
                   cross_attention_dim=int(cfg.get("cross_attention_dim", 1024)), norm_num_groups=groups,
                   norm_eps=cfg.get("norm_eps", 1e-5), downsample_padding=cfg.get("downsample_padding", 1),
                   sample_size=cfg.get("sample_size"))

    def to_dict(self) -> dict:
        return asdict(self)



_UP_FOR_DOWN = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}
# ControlNetModel's own fields; the rest of its config describes the UNet encoder it copies.
_CONTROLNET_FIELDS = ("conditioning_channels", "conditioning_embedding_out_channels", "global_pool_conditions",
                      "controlnet_conditioning_channel_order", "addition_embed_type_num_heads")


@dataclass(frozen=True)
class ControlNetConfig:
    """diffusers' ControlNetModel: a copy of the UNet's encoder (``encoder``, parsed as a UNet config whose
    up path mirrors the down path and is never built), the conditioning image embedding (``conv_in``, blocks
    of ``conditioning_embedding_out_channels``, ``conv_out`` to the UNet's first width) and the zero convs."""

    encoder: UNetConfig
    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple = (16, 32, 96, 256)
    global_pool_conditions: bool = False
    channel_order: str = "rgb"  # "bgr": the control image's channels are flipped before the embedding

    @property
    def cross_attention_dim(self) -> int:
        return self.encoder.cross_attention_dim

    @property
    def in_channels(self) -> int:
        return self.encoder.in_channels

    @property
    def downscale_factor(self) -> int:
        """How much smaller than the control image the latent is (the embedding's stride-2 convolutions)."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    @classmethod
    def from_dict(cls, cfg: dict) -> "ControlNetConfig":
        c = "ControlNet"
        _require(cfg, "controlnet_conditioning_channel_order", ("rgb", "bgr"), c)
        _require(cfg, "mid_block_type", ("UNetMidBlock2DCrossAttn",), c)
        embedding = cfg.get("conditioning_embedding_out_channels", cls.conditioning_embedding_out_channels)
        if not isinstance(embedding, (list, tuple)) or not embedding or any(
                not isinstance(v, int) or v < 1 for v in embedding):
            raise UnsupportedModelError(f"{c} config: conditioning_embedding_out_channels={embedding!r} must be a "
                                        "list of positive channel counts")
        channels = cfg.get("conditioning_channels", 3)
        if not isinstance(channels, int) or channels < 1:
            raise UnsupportedModelError(f"{c} config: conditioning_channels={channels!r} must be a positive integer")
        down = list(cfg.get("down_block_types", UNetConfig.down_block_types))
        for t in down:
            if t not in _UP_FOR_DOWN:
                raise UnsupportedModelError(f"{c} config: down block type {t!r} is not supported ({_UNET_DOWN})")
        unet = {k: v for k, v in cfg.items() if k not in _CONTROLNET_FIELDS}
        unet.update(up_block_types=[_UP_FOR_DOWN[t] for t in reversed(down)],
                    out_channels=cfg.get("in_channels", 4))
        unet.setdefault("cross_attention_dim", 1280)  # ControlNetModel's default (the UNet's is 768)
        return cls(UNetConfig.from_dict(unet), channels, tuple(embedding),
                   bool(cfg.get("global_pool_conditions", False)),
                   cfg.get("controlnet_conditioning_channel_order", "rgb"))

    def to_dict(self) -> dict:
        return asdict(self)
