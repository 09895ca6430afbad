"""The original CompVis/LDM checkpoint format of Stable Diffusion 1.x / 2.x, as data: which tensor of a
single-file checkpoint makes each diffusers-named parameter (key maps), and the architecture the tensor
shapes say (configs). Reads headers only; writes nothing (``single_file`` turns this into a ModelSource).

What the file does not say comes from the ``.yaml`` beside it (the original LDM config, as AUTOMATIC1111
keeps it), then from the family's conventions: the text encoder's key naming tells SD 1.x
(``cond_stage_model.transformer.*``, CLIP ViT-L) from SD 2.x (``cond_stage_model.model.*``, OpenCLIP
ViT-H, its penultimate layer); channels, blocks, layers per block, transformer depth, projection kind,
cross-attention width, input channels (9: inpainting), VAE and text-encoder sizes are read from the tensor
shapes. Not stored in any checkpoint and so taken from the family (or the .yaml's ``num_heads`` /
``num_head_channels``): attention heads (SD 1: 8 per block; SD 2: 64-channel heads), GroupNorm groups (32,
fixed in LDM's code), the text encoder's heads (64-channel heads) and activation, the tokenizer (the CLIP
vocabulary shipped in ``data/clip-tokenizer``; SD 2 pads with ``!``) and the scheduler
(``data/single_file``). The key mappings follow diffusers' ``loaders/single_file_utils.py`` (the fact
source; nothing of diffusers is imported). EMA: like diffusers' ``from_single_file`` and AUTOMATIC1111, the
weights under ``model.diffusion_model`` are used by default; ``use_ema=True`` takes the ``model_ema.*``
copies instead.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

from .checkpoint_io import PICKLE_SUFFIXES, SAFETENSORS_SUFFIX, check_safetensors, load_torch_pickle
from .config import read_json
from .errors import ModelSourceError, UnsupportedModelError, WeightLoadError
from .weights import KeyMap, transformed_shape

DATA = Path(__file__).resolve().parent / "data"
TEMPLATES = DATA / "single_file"  # per family: model index, component configs, scheduler, tokenizer config
CLIP_VOCABULARY = DATA / "clip-tokenizer"  # vocab.json.gz, merges.txt.gz
CLIP_VOCAB_SIZE = 49408

UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
VAE_PREFIXES = ("first_stage_model.", "vae.")
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x: transformers' CLIPTextModel names inside
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: OpenCLIP names, fused attention projections
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."  # SDXL base: CLIP-L, transformers' names
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."  # SDXL base: OpenCLIP bigG, with text_projection
REFINER_OPEN_CLIP_PREFIX = "conditioner.embedders.0.model."  # SDXL refiner: OpenCLIP bigG is its only encoder
# Key groups named in errors (longest first); any other key is grouped by its first name.
KNOWN_GROUPS = ("model.diffusion_model", "model_ema", "first_stage_model", "cond_stage_model.transformer",
                "cond_stage_model.model", "conditioner.embedders", "control_model", "lora_unet", "lora_te")
IGNORED_TOP_LEVEL = re.compile(r"(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_.*|log_one_minus_.*|posterior_.*"
                               r"|lvlb_weights|logvar|model_ema\.decay|model_ema\.num_updates|scale_factor)")
YAML_SUFFIXES = (".yaml", ".yml")
VAE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")

# ----------------------------------------------------------------------------------- key tables
UNET_FIXED = {"time_embed.0.": "time_embedding.linear_1.", "time_embed.2.": "time_embedding.linear_2.",
              "input_blocks.0.0.": "conv_in.", "out.0.": "conv_norm_out.", "out.2.": "conv_out."}
UNET_RESNET = (("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("out_layers.0.", "norm2."),
               ("out_layers.3.", "conv2."), ("emb_layers.1.", "time_emb_proj."), ("skip_connection.", "conv_shortcut."))
_MATRIX = ("matrix",)  # LDM's VAE attention projections are 1x1 convolutions; diffusers' are Linear
# LDM VAE key -> diffusers key ("{up}": decoder.up.N is up_blocks.(levels - 1 - N): LDM counts from the bottom).
VAE_RULES = (
    (r"(encoder|decoder)\.(conv_in|conv_out)\.(weight|bias)", r"\1.\2.\3", ()),
    (r"(encoder|decoder)\.norm_out\.(weight|bias)", r"\1.conv_norm_out.\2", ()),
    (r"(quant_conv|post_quant_conv)\.(weight|bias)", r"\1.\2", ()),
    (r"encoder\.down\.(\d+)\.block\.(\d+)\.nin_shortcut\.(weight|bias)", r"encoder.down_blocks.\1.resnets.\2.conv_shortcut.\3", ()),
    (r"encoder\.down\.(\d+)\.block\.(\d+)\.((?:norm|conv)[12]\.(?:weight|bias))", r"encoder.down_blocks.\1.resnets.\2.\3", ()),
    (r"encoder\.down\.(\d+)\.downsample\.conv\.(weight|bias)", r"encoder.down_blocks.\1.downsamplers.0.conv.\2", ()),
    (r"(encoder|decoder)\.mid\.block_1\.nin_shortcut\.(weight|bias)", r"\1.mid_block.resnets.0.conv_shortcut.\2", ()),
    (r"(encoder|decoder)\.mid\.block_2\.nin_shortcut\.(weight|bias)", r"\1.mid_block.resnets.1.conv_shortcut.\2", ()),
    (r"(encoder|decoder)\.mid\.block_1\.((?:norm|conv)[12]\.(?:weight|bias))", r"\1.mid_block.resnets.0.\2", ()),
    (r"(encoder|decoder)\.mid\.block_2\.((?:norm|conv)[12]\.(?:weight|bias))", r"\1.mid_block.resnets.1.\2", ()),
    (r"(encoder|decoder)\.mid\.attn_1\.norm\.(weight|bias)", r"\1.mid_block.attentions.0.group_norm.\2", ()),
    (r"(encoder|decoder)\.mid\.attn_1\.(q|k|v)\.(weight|bias)", r"\1.mid_block.attentions.0.to_\2.\3", _MATRIX),
    (r"(encoder|decoder)\.mid\.attn_1\.proj_out\.(weight|bias)", r"\1.mid_block.attentions.0.to_out.0.\2", _MATRIX),
    (r"decoder\.up\.(\d+)\.block\.(\d+)\.nin_shortcut\.(weight|bias)", r"decoder.up_blocks.{up}.resnets.\2.conv_shortcut.\3", ()),
    (r"decoder\.up\.(\d+)\.block\.(\d+)\.((?:norm|conv)[12]\.(?:weight|bias))", r"decoder.up_blocks.{up}.resnets.\2.\3", ()),
    (r"decoder\.up\.(\d+)\.upsample\.conv\.(weight|bias)", r"decoder.up_blocks.{up}.upsamplers.0.conv.\2", ()),
)
# OpenCLIP (prefix removed) -> transformers CLIPTextModel; in_proj_* split into q/k/v rows.
OPEN_CLIP_FIXED = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
                   "positional_embedding": "text_model.embeddings.position_embedding.weight",
                   "ln_final.weight": "text_model.final_layer_norm.weight",
                   "ln_final.bias": "text_model.final_layer_norm.bias"}
OPEN_CLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                   "attn.out_proj": "self_attn.out_proj"}
OPEN_CLIP_UNUSED = ("text_projection", "logit_scale", "attn_mask")  # SD 2 uses the token states, not the projection
# SDXL's add_embedding (pooled text + micro-conditioning ids) is LDM's label_emb.
UNET_TEXT_TIME = {"label_emb.0.0.": "add_embedding.linear_1.", "label_emb.0.2.": "add_embedding.linear_2."}


@dataclass(frozen=True)
class TextEncoderKeys:
    """Where one text encoder sits in a checkpoint and how it is named: ``"clip"`` (transformers' names
    under a prefix), ``"open_clip"`` (OpenCLIP's, every block and the projection: SDXL) or
    ``"open_clip_penultimate"`` (SD 2: the last block and the projection are unused)."""

    component: str
    prefix: str
    naming: str


@dataclass(frozen=True)
class Family:
    """A checkpoint family: its text encoders (in the order their states are concatenated), whether the
    UNet has SDXL's text_time embedding, and its configs template (``data/single_file/<name>.json``)."""

    name: str
    text_encoders: tuple[TextEncoderKeys, ...]
    text_time: bool = False


# First match wins: an SDXL base file holds embedders.0 (CLIP-L) and embedders.1 (OpenCLIP), a refiner's
# embedders.0 is OpenCLIP.
FAMILIES = (
    Family("sdxl", (TextEncoderKeys("text_encoder", SDXL_CLIP_PREFIX, "clip"),
                    TextEncoderKeys("text_encoder_2", SDXL_OPEN_CLIP_PREFIX, "open_clip")), text_time=True),
    Family("sdxl_refiner", (TextEncoderKeys("text_encoder_2", REFINER_OPEN_CLIP_PREFIX, "open_clip"),), text_time=True),
    Family("sd1", (TextEncoderKeys("text_encoder", CLIP_PREFIX, "clip"),)),
    Family("sd2", (TextEncoderKeys("text_encoder", OPEN_CLIP_PREFIX, "open_clip_penultimate"),)),
)


def checkpoint_family(keys: Iterable[str]) -> Family | None:
    """The family whose every text-encoder prefix occurs among ``keys``."""
    keys = list(keys)
    return next((f for f in FAMILIES if all(any(k.startswith(t.prefix) for k in keys) for t in f.text_encoders)),
                None)


@dataclass(frozen=True)
class OriginalConfig:
    """What the LDM ``.yaml`` beside a checkpoint says that the tensors cannot."""

    path: Path | None = None
    parameterization: str | None = None  # "v": v-prediction (SD 2.x 768-v)
    scale_factor: float | None = None
    num_heads: int | None = None
    num_head_channels: int | None = None

    @classmethod
    def beside(cls, checkpoint: Path) -> "OriginalConfig":
        for suffix in YAML_SUFFIXES:
            path = checkpoint.with_suffix(suffix)
            if path.is_file():
                return cls.read(path)
        return cls()

    @classmethod
    def read(cls, path: Path) -> "OriginalConfig":
        import yaml

        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except (OSError, yaml.YAMLError) as e:
            raise ModelSourceError(f"{path} (the original config beside the checkpoint) is not readable YAML: {e}") from e
        params = ((data or {}).get("model") or {}).get("params") or {} if isinstance(data, dict) else {}
        unet = (params.get("unet_config") or {}).get("params") or {}

        def positive(value: Any) -> int | None:
            return int(value) if isinstance(value, int) and value > 0 else None

        scale = params.get("scale_factor")
        return cls(path, params.get("parameterization"), float(scale) if isinstance(scale, (int, float)) else None,
                   positive(unet.get("num_heads")), positive(unet.get("num_head_channels")))

    @property
    def prediction_type(self) -> str | None:
        return {"v": "v_prediction", "eps": "epsilon"}.get(self.parameterization or "")


# ------------------------------------------------------------------------------------- reading
def checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, from a safetensors header or a weights-only (never code-executing) pickle read."""
    if path.suffix == SAFETENSORS_SUFFIX:
        header = check_safetensors(path)
        return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    if path.suffix in PICKLE_SUFFIXES:
        return {k: tuple(v.shape) for k, v in load_torch_pickle(path, mmap=True).items()}
    raise ModelSourceError(f"{path}: not a checkpoint file (expected {SAFETENSORS_SUFFIX} or one of {PICKLE_SUFFIXES})")


def key_groups(keys: Iterable[str]) -> str:
    """``'model.diffusion_model' (686 keys), 'first_stage_model' (248 keys) ...`` for error messages."""
    counts: Counter = Counter()
    for k in keys:
        counts[next((g for g in KNOWN_GROUPS if k == g or k.startswith(g + ".") or k.startswith(g + "_")),
                    k.split(".")[0])] += 1
    return ", ".join(f"{g!r} ({n} keys)" for g, n in counts.most_common(12)) or "no tensors at all"


def mapped_shapes(shapes: Mapping[str, tuple[int, ...]], key_map: KeyMap) -> dict[str, tuple[int, ...]]:
    """The shapes the parameters get through ``key_map`` (config inference from a header alone)."""
    return {t: transformed_shape(shapes[s], op) for t, (s, op) in key_map.items()}


# ------------------------------------------------------------------------------------------ UNet
def _resnet_name(rest: str, where: str) -> str:
    for old, new in UNET_RESNET:
        if rest.startswith(old):
            return new + rest[len(old):]
    raise WeightLoadError(f"unrecognised UNet resnet key {where}.{rest}")


def unet_key_map(keys: Iterable[str], encoder_only: bool = False,
                 text_time: bool = False) -> tuple[dict[str, str], list[int], list[int]]:
    """LDM UNet keys (prefix removed) -> {diffusers name: LDM key}, layers per down block, per up block.
    ``encoder_only``: a ControlNet's copy of the encoder (no ``output_blocks``, no ``out``).

    The block structure is read from the keys: in ``input_blocks`` a downsampler (``.0.op``) closes a
    level; in ``output_blocks`` an upsampler (``.1.conv`` or ``.2.conv``) does. ``text_time``: SDXL's
    ``label_emb`` is the add_embedding."""
    fixed_names = {**UNET_FIXED, **UNET_TEXT_TIME} if text_time else UNET_FIXED
    out: dict[str, str] = {}
    blocks: dict[tuple[str, int], dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    mid: dict[int, list[str]] = defaultdict(list)
    unknown = []
    for k in keys:
        fixed = next((old for old in fixed_names if k.startswith(old)), None)
        if fixed is not None:
            out[fixed_names[fixed] + k[len(fixed):]] = k
        elif m := re.fullmatch(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)", k):
            blocks[(m[1], int(m[2]))][int(m[3])].append(m[4])
        elif m := re.fullmatch(r"middle_block\.(\d+)\.(.+)", k):
            mid[int(m[1])].append(m[2])
        else:
            unknown.append(k)
    if unknown:
        raise UnsupportedModelError(f"the UNet has keys this port does not know (class-conditioned or ControlNet "
                                    f"UNets are not supported): {', '.join(sorted(unknown)[:8])}")

    def add(target: str, source: str) -> None:
        out[target] = source

    down: list[int] = []
    level = j = 0
    for i in sorted(i for s, i in blocks if s == "input_blocks"):
        parts, where = blocks[("input_blocks", i)], f"input_blocks.{i}"
        if set(parts) == {0} and all(r.startswith("op.") for r in parts[0]):
            for r in parts[0]:
                add(f"down_blocks.{level}.downsamplers.0.conv.{r[3:]}", f"{where}.0.{r}")
            down.append(j)
            level, j = level + 1, 0
            continue
        for sub, rests in parts.items():
            if sub not in (0, 1):
                raise UnsupportedModelError(f"unrecognised UNet keys under {where}.{sub}")
            for r in rests:
                add(f"down_blocks.{level}.resnets.{j}.{_resnet_name(r, where + '.0')}" if sub == 0
                    else f"down_blocks.{level}.attentions.{j}.{r}", f"{where}.{sub}.{r}")
        j += 1
    down.append(j)

    up: list[int] = []
    level = j = 0
    for i in sorted(i for s, i in blocks if s == "output_blocks"):
        parts, where = blocks[("output_blocks", i)], f"output_blocks.{i}"
        upsampled = False
        for sub, rests in parts.items():
            if sub == 0:
                for r in rests:
                    add(f"up_blocks.{level}.resnets.{j}.{_resnet_name(r, where + '.0')}", f"{where}.0.{r}")
            elif all(r.startswith("conv.") for r in rests):
                upsampled = True
                for r in rests:
                    add(f"up_blocks.{level}.upsamplers.0.conv.{r[5:]}", f"{where}.{sub}.{r}")
            elif sub == 1:
                for r in rests:
                    add(f"up_blocks.{level}.attentions.{j}.{r}", f"{where}.1.{r}")
            else:
                raise UnsupportedModelError(f"unrecognised UNet keys under {where}.{sub}")
        j += 1
        if upsampled:
            up.append(j)
            level, j = level + 1, 0
    if j:
        up.append(j)

    for sub, rests in mid.items():
        attention = any(r.startswith(("transformer_blocks.", "proj_in.")) for r in rests)
        if (sub == 1) != attention or sub > 2:
            raise UnsupportedModelError("the UNet's middle block is not resnet-attention-resnet")
        for r in rests:
            target = (f"mid_block.attentions.0.{r}" if sub == 1
                      else f"mid_block.resnets.{sub // 2}.{_resnet_name(r, f'middle_block.{sub}')}")
            add(target, f"middle_block.{sub}.{r}")
    n = len(down)
    if encoder_only and not up and 0 not in down:
        return out, down, up
    if 0 in down or len(up) != n or any(up[u] != down[n - 1 - u] + 1 for u in range(n)):
        raise UnsupportedModelError(f"the UNet's blocks do not pair up (resnets per down block {down}, per up "
                                    f"block {up}); is the file complete?")
    return out, down, up


def _one_or_list(values: list) -> Any:
    return values[0] if len(set(values)) == 1 else values


def unet_config(shapes: Mapping[str, tuple[int, ...]], names: Mapping[str, str], down: list[int], family: str,
                original: OriginalConfig) -> dict[str, Any]:
    """The UNet's diffusers config entries that the tensors (and the .yaml) determine."""
    def shape(name: str) -> tuple[int, ...]:
        return shapes[names[name]]

    n = len(down)
    channels = [shape(f"down_blocks.{b}.resnets.0.conv1.weight")[0] for b in range(n)]
    down_attn = [any(k.startswith(f"down_blocks.{b}.attentions.") for k in names) for b in range(n)]
    up_attn = [any(k.startswith(f"up_blocks.{u}.attentions.") for k in names) for u in range(n)]

    def blocks_in(path: str) -> int:
        return len({m[1] for k in names for m in [re.match(rf"{path}\.transformer_blocks\.(\d+)\.", k)] if m})

    # Blocks without attention have no depth; diffusers' mid block takes the last entry, so it is the mid's.
    depth = [blocks_in(rf"down_blocks\.{b}\.attentions\.0") or 1 for b in range(n)]
    mid_depth = blocks_in(r"mid_block\.attentions\.0")
    if mid_depth:
        attended = {d for d, a in zip(depth, down_attn) if a}
        depth = mid_depth if attended <= {mid_depth} else depth[:-1] + [mid_depth if not down_attn[-1] else depth[-1]]
    cross = [shape(k)[1] for k in names if k.endswith("attn2.to_k.weight")]
    proj = [len(shape(k)) for k in names if k.endswith("proj_in.weight")]
    if original.num_heads:
        heads: Any = original.num_heads
    else:
        per_head = original.num_head_channels or (64 if family != "sd1" else None)  # SD 2, SDXL: 64-channel heads
        heads = [max(1, c // per_head) for c in channels] if per_head else 8  # LDM SD 1.x: num_heads 8
    config = {
        "in_channels": shape("conv_in.weight")[1],
        "out_channels": shape("conv_out.weight")[0] if "conv_out.weight" in names else None,  # None: a ControlNet
        "block_out_channels": channels, "layers_per_block": _one_or_list(down),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attn],
        "transformer_layers_per_block": depth if isinstance(depth, int) else _one_or_list(depth),
        "attention_head_dim": heads,
        "use_linear_projection": bool(proj) and proj[0] == 2,
        "mid_block_type": "UNetMidBlock2DCrossAttn" if any(k.startswith("mid_block.") for k in names) else None,
    }
    if cross:
        config["cross_attention_dim"] = cross[0]
    return config


# ------------------------------------------------------------------------------------------- VAE
def vae_key_map(keys: Iterable[str]) -> KeyMap:
    """LDM VAE keys (prefix removed) -> {diffusers name: (LDM key, op)}; unknown keys are an error."""
    keys = list(keys)
    levels = len({m[1] for k in keys for m in [re.match(r"decoder\.up\.(\d+)\.", k)] if m})
    out, unknown = {}, []
    for k in keys:
        for pattern, replacement, op in VAE_RULES:
            m = re.fullmatch(pattern, k)
            if m:
                target = m.expand(replacement)
                if "{up}" in target:
                    target = target.replace("{up}", str(levels - 1 - int(m[1])))
                out[target] = (k, op)
                break
        else:
            unknown.append(k)
    if unknown:
        raise UnsupportedModelError(f"the VAE has keys this port does not know: {', '.join(sorted(unknown)[:8])}")
    return out


def vae_config(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """The VAE's diffusers config entries that the tensors determine (``shapes`` under diffusers' names)."""
    try:
        n = len({m[1] for k in shapes for m in [re.match(r"encoder\.down_blocks\.(\d+)\.", k)] if m})
        channels = [shapes[f"encoder.down_blocks.{b}.resnets.0.conv1.weight"][0] for b in range(n)]
        layers = len({m[1] for k in shapes for m in [re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", k)] if m})
        config = {"in_channels": shapes["encoder.conv_in.weight"][1], "out_channels": shapes["decoder.conv_out.weight"][0],
                  "latent_channels": shapes["post_quant_conv.weight"][0], "block_out_channels": channels,
                  "layers_per_block": layers, "down_block_types": ["DownEncoderBlock2D"] * n,
                  "up_block_types": ["UpDecoderBlock2D"] * n}
    except KeyError as e:
        raise WeightLoadError(f"the VAE lacks {e.args[0]!r}; is the file complete?") from None
    if not n:
        raise WeightLoadError("the VAE has no encoder blocks; is the file complete?")
    return config


def vae_names(keys: Iterable[str]) -> tuple[KeyMap, str]:
    """A VAE's tensors under diffusers' names, whatever the file's naming: (key map, naming found)."""
    keys = list(keys)
    prefix = next((p for p in VAE_PREFIXES if any(k.startswith(p) for k in keys)), "")
    inner = [k[len(prefix):] for k in keys if k.startswith(prefix)]
    if not prefix:  # a VAE file: training leftovers (loss.*, model_ema.*) are not the VAE
        _warn_unused("the VAE file", [k for k in inner if not k.startswith(VAE_PARTS)])
        inner = [k for k in inner if k.startswith(VAE_PARTS)]
    if any(k.startswith("encoder.down_blocks.") for k in inner):  # diffusers' own naming
        return {k: (prefix + k, ()) for k in inner}, "diffusers"
    if any(k.startswith("encoder.down.") for k in inner):
        return {t: (prefix + s, op) for t, (s, op) in vae_key_map(inner).items()}, "ldm"
    raise ModelSourceError(f"no VAE found (neither LDM 'encoder.down.*' nor diffusers 'encoder.down_blocks.*' "
                           f"keys); the file holds {key_groups(keys)}")


# ---------------------------------------------------------------------------------- text encoders
def clip_key_map(keys: Iterable[str], family: str) -> KeyMap:
    """The SD 1.x / 2.x text encoder's tensors under transformers' CLIPTextModel names (``text_model.*``)."""
    encoder = next(f for f in FAMILIES if f.name == family).text_encoders[0]
    return text_encoder_key_map(keys, encoder)


def text_encoder_key_map(keys: Iterable[str], encoder: TextEncoderKeys) -> KeyMap:
    """One text encoder's tensors under transformers' names (``text_model.*``, and SDXL's
    ``text_projection.weight``: OpenCLIP's (width, projection) matrix transposed)."""
    prefix = encoder.prefix
    if encoder.naming == "clip":
        out = {}
        for k in keys:
            if k.startswith(prefix):
                name = k[len(prefix):]
                name = name if name.startswith("text_model.") else "text_model." + name
                if not name.endswith("position_ids"):
                    out[name] = (k, ())
        return out
    penultimate = encoder.naming == "open_clip_penultimate"
    inner = [k[len(prefix):] for k in keys if k.startswith(prefix)]
    blocks = {int(m[1]) for k in inner for m in [re.match(r"transformer\.resblocks\.(\d+)\.", k)] if m}
    last = max(blocks, default=-1) if penultimate else None  # SD 2 conditions on the penultimate layer
    out, unknown = {}, []
    for k in inner:
        source = prefix + k
        if k in OPEN_CLIP_FIXED:
            out[OPEN_CLIP_FIXED[k]] = (source, ())
        elif k == "text_projection" and not penultimate:
            out["text_projection.weight"] = (source, ("transpose",))
        elif m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", k):
            if int(m[1]) == last:
                continue
            layer = f"text_model.encoder.layers.{m[1]}"
            if m[2] in OPEN_CLIP_LAYER:
                out[f"{layer}.{OPEN_CLIP_LAYER[m[2]]}.{m[3]}"] = (source, ())
            else:
                unknown.append(k)
        elif m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", k):
            if int(m[1]) != last:
                for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
                    out[f"text_model.encoder.layers.{m[1]}.self_attn.{name}.{m[2]}"] = (source, ("rows", i, 3))
        elif k not in OPEN_CLIP_UNUSED:
            unknown.append(k)
    if unknown:
        raise UnsupportedModelError(f"the OpenCLIP text encoder has keys this port does not know: "
                                    f"{', '.join(sorted(prefix + k for k in unknown)[:8])}")
    return out


def clip_config(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """The text encoder's config entries the tensors determine (``shapes`` under CLIPTextModel names)."""
    try:
        vocab, hidden = shapes["text_model.embeddings.token_embedding.weight"]
        positions = shapes["text_model.embeddings.position_embedding.weight"][0]
        intermediate = shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0]
    except KeyError as e:
        raise WeightLoadError(f"the text encoder lacks {e.args[0]!r}; is the file complete?") from None
    layers = len({m[1] for k in shapes for m in [re.match(r"text_model\.encoder\.layers\.(\d+)\.", k)] if m})
    return {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": intermediate,
            "num_hidden_layers": layers, "max_position_embeddings": positions}


# ------------------------------------------------------------------------------------ the model
@dataclass(frozen=True)
class SingleFilePlan:
    """What one checkpoint file is: its family, each component's key map and (unless ``config=`` gives
    them) the inferred configs."""

    family: str  # "sd1" (CLIP), "sd2" (OpenCLIP), "sdxl" (CLIP-L + OpenCLIP bigG), "sdxl_refiner" (OpenCLIP bigG)
    key_maps: dict[str, KeyMap]
    unet_blocks: list[int]  # resnets per down block, as read from the keys
    configs: dict[str, dict[str, Any]] | None = None  # diffusers configs + "scheduler", "tokenizer*", "model_index"

    @property
    def text_encoders(self) -> tuple[TextEncoderKeys, ...]:
        return next(f for f in FAMILIES if f.name == self.family).text_encoders


def plan_checkpoint(shapes: Mapping[str, tuple[int, ...]], origin: str, *, use_ema: bool = False,
                    prediction_type: str | None = None, original: OriginalConfig = OriginalConfig(),
                    infer: bool = True) -> SingleFilePlan:
    """A Stable Diffusion 1.x / 2.x / XL checkpoint's key maps and (``infer``) architecture, from its tensor shapes."""
    maps = key_maps(shapes, origin, use_ema)
    return replace(maps, configs=infer_configs(shapes, maps, origin, prediction_type, original)) if infer else maps


def key_maps(shapes: Mapping[str, tuple[int, ...]], origin: str, use_ema: bool = False) -> SingleFilePlan:
    """Which tensor of the file makes each parameter of the UNet, the VAE and the text encoder(s)."""
    keys = list(shapes)
    family = checkpoint_family(keys)
    has_vae = any(k.startswith(VAE_PREFIXES) for k in keys)
    if family is None or not has_vae or not any(k.startswith(UNET_PREFIX) for k in keys):
        raise UnsupportedModelError(
            f"{origin} is not a Stable Diffusion 1.x/2.x or SDXL checkpoint in the original (CompVis/LDM, Stability) "
            f"naming: it holds {key_groups(keys)}; expected 'model.diffusion_model' (UNet), 'first_stage_model' (VAE) "
            "and 'cond_stage_model.transformer' (SD 1.x CLIP), 'cond_stage_model.model' (SD 2.x OpenCLIP), "
            "'conditioner.embedders.0.transformer' with 'conditioner.embedders.1.model' (SDXL: CLIP-L and OpenCLIP "
            "bigG) or 'conditioner.embedders.0.model' (SDXL refiner: OpenCLIP bigG)")
    names, down, _ = unet_key_map((k[len(UNET_PREFIX):] for k in keys if k.startswith(UNET_PREFIX)), text_time=family.text_time)
    if use_ema:
        ema = {t: EMA_PREFIX + "diffusion_model" + s.replace(".", "") for t, s in names.items()}
        missing = [e for e in ema.values() if e not in shapes]
        if missing:
            have = "no EMA weights" if not any(k.startswith(EMA_PREFIX) for k in keys) else \
                f"EMA copies of only {len(ema) - len(missing)} of the UNet's {len(ema)} tensors"
            raise WeightLoadError(f"use_ema=True, but {origin} has {have} ('model_ema.*'); load it with use_ema=False")
        unet_map = {t: (e, ()) for t, e in ema.items()}
    else:
        unet_map = {t: (UNET_PREFIX + s, ()) for t, s in names.items()}
    vae_map, _ = vae_names(k for k in keys if k.startswith(VAE_PREFIXES))
    used = (UNET_PREFIX, EMA_PREFIX, *VAE_PREFIXES, *(t.prefix for t in family.text_encoders))
    _warn_unused(origin, [k for k in keys if not k.startswith(used)])
    maps = {"unet": unet_map, "vae": vae_map, **{t.component: text_encoder_key_map(keys, t) for t in family.text_encoders}}
    return SingleFilePlan(family.name, maps, down)


def _warn_unused(origin: str, keys: list[str]) -> None:
    """Tensors of no network this port loads (scheduler buffers aside) are named, not dropped silently."""
    extra = [k for k in keys if not IGNORED_TOP_LEVEL.fullmatch(k)]
    if extra:
        warnings.warn(f"{origin}: {len(extra)} tensors belong to no network loaded here and are not used: "
                      f"{key_groups(extra)}", stacklevel=5)


TOKENIZER_OF = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}  # diffusers' folder names


def _text_encoder_config(template: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], key_map: KeyMap,
                         origin: str) -> dict[str, Any]:
    mapped = mapped_shapes(shapes, key_map)
    text = {**template, **clip_config(mapped)}
    hidden = text["hidden_size"]
    if hidden % 64:
        raise UnsupportedModelError(f"{origin}: the text encoder is {hidden} wide, not a multiple of CLIP's 64-channel "
                                    "heads, so its head count is unknown; pass config= (a diffusers folder or hub id "
                                    "with this model's configs)")
    text["num_attention_heads"] = hidden // 64
    if text["vocab_size"] != CLIP_VOCAB_SIZE:
        raise UnsupportedModelError(f"{origin}: the text encoder has {text['vocab_size']} token embeddings, not CLIP's "
                                    f"{CLIP_VOCAB_SIZE}, so the bundled tokenizer does not fit; pass config= (a diffusers "
                                    "folder or hub id with its tokenizer)")
    if "text_projection.weight" in mapped:
        text["projection_dim"] = mapped["text_projection.weight"][0]
    return text


def _text_time(unet: dict[str, Any], unet_shapes: Mapping[str, tuple[int, ...]], pooled: int, origin: str) -> bool:
    """SDXL's add_embedding input width -> the config entry; True when its ids are the refiner's five
    (aesthetic score instead of the target size)."""
    width = unet_shapes["add_embedding.linear_1.weight"][1]
    unet["projection_class_embeddings_input_dim"] = width
    per_id = unet["addition_time_embed_dim"]
    ids, rest = divmod(width - pooled, per_id)
    if rest or ids not in (5, 6):
        raise UnsupportedModelError(f"{origin}: the UNet's add_embedding takes {width} inputs, which is not the "
                                    f"{pooled}-wide pooled text plus 5 or 6 micro-conditioning ids of {per_id}; pass "
                                    "config= for this model")
    return ids == 5


def infer_configs(shapes: Mapping[str, tuple[int, ...]], plan: SingleFilePlan, origin: str,
                  prediction_type: str | None, original: OriginalConfig) -> dict[str, dict[str, Any]]:
    """Every config a diffusers folder would hold, from the family's template and the tensor shapes."""
    family, template = plan.family, read_json(TEMPLATES / f"{plan.family}.json")
    unet_shapes = {t: shapes[s] for t, (s, _) in plan.key_maps["unet"].items()}
    names = {t: t for t in unet_shapes}
    texts = {t.component: _text_encoder_config(template[t.component], shapes, plan.key_maps[t.component], origin)
             for t in plan.text_encoders}
    width = sum(t["hidden_size"] for t in texts.values())
    vae = {**template["vae"], **vae_config(mapped_shapes(shapes, plan.key_maps["vae"]))}
    if original.scale_factor is not None:
        vae["scaling_factor"] = original.scale_factor
    unet = {**template["unet"], **unet_config(unet_shapes, names, plan.unet_blocks, family, original)}
    if unet.get("cross_attention_dim") != width:
        raise UnsupportedModelError(f"{origin}: the UNet attends to {unet.get('cross_attention_dim')}-wide text states "
                                    f"but the text encoder states are {width} wide; pass config= for this model")
    index = dict(template["model_index"])
    if "add_embedding.linear_1.weight" in unet_shapes and _text_time(
            unet, unet_shapes, texts["text_encoder_2"]["projection_dim"], origin):
        index["requires_aesthetics_score"] = True
    prediction = prediction_type or original.prediction_type or "epsilon"
    if family == "sd2" and prediction_type is None and original.prediction_type is None:
        warnings.warn(f"{origin} is an SD 2.x checkpoint without a .yaml beside it: assuming epsilon prediction "
                      "(2.x-base); 768-v models need prediction_type='v_prediction'", stacklevel=4)
    image = 768 if family == "sd2" and prediction == "v_prediction" else template.get("image_size", 512)
    unet["sample_size"] = image // 2 ** (len(vae["block_out_channels"]) - 1)
    vae["sample_size"] = image
    if unet["in_channels"] == 9:
        index["_class_name"] = template.get("inpainting_pipeline", "StableDiffusionInpaintPipeline")
    tokenizers = {TOKENIZER_OF[name]: template[TOKENIZER_OF[name]] for name in texts}
    return {"unet": unet, "vae": vae, **texts, "model_index": index, **tokenizers,
            "scheduler": {**template["scheduler"], "prediction_type": prediction}}
