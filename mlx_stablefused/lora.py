"""LoRA files: find them, read them safely, name their layers as our modules are named, and keep the
adapters of one loaded model (several at once, weighted; unfused by default, or fused into the weights).

Formats (key names as kohya-ss sd-scripts writes them and as diffusers' ``lora_conversion_utils`` reads
them; our own mapping, written as tables below):

* kohya / AUTOMATIC1111: ``lora_unet_<path with _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``,
  ``lora_te_`` (``lora_te1_``, ``lora_te2_``) for the text encoder(s); UNet paths in diffusers' names or in
  the original LDM UNet's (``input_blocks_4_1_proj_in``, ``middle_block_1``, ``output_blocks_3_0_in_layers_2``);
  LyCORIS LoCon uses the same keys with 4-D convolution matrices (a kh x kw down, a 1x1 up). Scale: alpha / rank
  (1 without alpha).
* diffusers: ``unet.`` / ``text_encoder.`` prefixes, ``.lora.down.weight`` / ``.lora.up.weight``, the old
  attention-processor names (``attn1.processor.to_q_lora.down.weight``), ``lora_linear_layer``; a file
  without component prefixes is a UNet's. AnimateDiff MotionLoRAs (diffusers' conversion, or the original
  ``v2_lora_*.ckpt`` naming with ``temporal_transformer`` / ``attention_blocks``) patch the motion modules.
* PEFT (what diffusers' ``save_lora_weights`` writes now): ``lora_A.weight`` / ``lora_B.weight``, optional
  ``base_model.model.`` prefix; the scale comes from the ``lora_adapter_metadata`` diffusers stores
  (``lora_alpha``, ``r``, ``alpha_pattern``, ``use_rslora``), else 1.

Kohya names are underscore-joined module paths, ambiguous as strings; they are resolved against the loaded
model's own module paths, so no guessing is involved. Every key must land on a layer of the model with a
fitting shape: a key that matches nothing (a LoRA for another model) is an error naming it, never a
silent "0 of N keys". What a backend does (attach the low-rank terms to a layer, fuse them into its weight)
is ``LoRAHost``'s (``backends/*/lora.py``); everything else here is numpy and framework-free.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol, Sequence

import numpy as np

from .checkpoint_io import PICKLE_SUFFIXES, SAFETENSORS_SUFFIX, check_safetensors, load_torch_pickle
from .errors import LoRAError, ModelSourceError, WeightLoadError

logger = logging.getLogger(__name__)

DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes


# ------------------------------------------------------------------------------------ key tables
# kohya prefix -> component.
KOHYA_PREFIXES = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder",
                  "lora_te2": "text_encoder_2"}
# diffusers / PEFT prefix -> component (no prefix: the UNet, as diffusers reads such files).
DOTTED_PREFIXES = {"unet": "unet", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2"}
# (key regex on the un-prefixed key, role): the module path is group 1. First match wins.
KEY_FORMS: tuple[tuple[str, str], ...] = (
    (r"(.+)\.lora_down\.weight", "down"),  # kohya and LyCORIS
    (r"(.+)\.lora_up\.weight", "up"),
    (r"(.+)\.lora_A\.weight", "down"),  # PEFT
    (r"(.+)\.lora_B\.weight", "up"),
    (r"(.+)\.lora(?:_linear_layer)?\.down\.weight", "down"),  # diffusers LoRACompatible layers
    (r"(.+)\.lora(?:_linear_layer)?\.up\.weight", "up"),
    (r"(.+)_lora\.down\.weight", "down"),  # diffusers attention processors: to_q_lora.down.weight
    (r"(.+)_lora\.up\.weight", "up"),
    (r"(.+)\.alpha", "alpha"),
)
# Key endings of LoRA variants this port does not apply: refused by name instead of half-applied.
UNSUPPORTED = {"dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "lora_mid.weight": "LoCon with a CP "
               "(Tucker) core (lora_mid)", "hada_w1_a": "LoHa", "hada_w1_b": "LoHa", "lokr_w1": "LoKr",
               "lokr_w1_a": "LoKr", "lokr_w2": "LoKr", "lokr_w2_a": "LoKr", "diff": "a full-weight difference",
               "diff_b": "a bias difference", "lora_B.bias": "a LoRA bias", "lora_up.bias": "a LoRA bias"}
# Old diffusers module names -> ours, per component; applied in order to a dotted path that matches nothing.
PATH_ALIASES: dict[str, tuple[tuple[str, str], ...]] = {
    "unet": ((r"\.processor(\.|$)", r"\1"), (r"(^|\.)to_out$", r"\1to_out.0")),
    "text_encoder": ((r"(^|\.)to_([qkv])$", r"\1\2_proj"), (r"(^|\.)to_out$", r"\1out_proj"),
                     (r"^(embeddings|encoder|final_layer_norm)(\.|$)", r"text_model.\1\2")),
}
PATH_ALIASES["text_encoder_2"] = PATH_ALIASES["text_encoder"]
LORA_COMPONENTS = tuple(DOTTED_PREFIXES.values())  # the networks a LoRA may patch
COMPONENT_LABELS = {"unet": "UNet", "text_encoder": "text encoder", "text_encoder_2": "second text encoder"}


# ------------------------------------------------------------------------------------ data types
@dataclass(frozen=True)
class TargetLayer:
    """A layer of the loaded model a LoRA may patch: a Linear (``kernel == ()``) or a 2-D convolution,
    with its output and input widths (1x1 convolutions that a backend holds as Linear count as Linear)."""

    out_features: int
    in_features: int
    kernel: tuple[int, ...] = ()
    quantized: bool = False


@dataclass(frozen=True)
class LoRALayer:
    """One layer's low-rank update, float32: ``down`` (r, in) or (r, in, kh, kw), ``up`` (out, r); the update
    is ``scale * up(down(x))``, where ``scale`` is the file's alpha / rank."""

    down: np.ndarray
    up: np.ndarray
    scale: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self) -> np.ndarray:
        """``scale * up @ down`` in the base weight's PyTorch layout, (out, in) or (out, in, kh, kw)."""
        return np.float32(self.scale) * np.tensordot(self.up, self.down, axes=(1, 0))


@dataclass(frozen=True)
class LoRAAdapter:
    """A LoRA file resolved against one model: component -> module path -> layer."""

    name: str
    origin: str
    layers: dict[str, dict[str, LoRALayer]]

    @property
    def layer_count(self) -> int:
        return sum(len(v) for v in self.layers.values())


@dataclass(frozen=True)
class LoRATerm:
    """What a backend adds to one layer's output: ``factor * up(down(x))``."""

    down: np.ndarray
    up: np.ndarray
    factor: float


class LoRAHost(Protocol):
    """What a backend provides so that LoRAs can be applied to its networks (``backends/*/lora.py``)."""

    def lora_targets(self) -> dict[str, dict[str, TargetLayer]]:
        """component -> module path (diffusers' names) -> the layer, for every patchable layer."""

    def set_terms(self, component: str, path: str, terms: Sequence[LoRATerm]) -> None:
        """Make the layer's output ``base(x) + sum(term)`` (no terms: the plain layer)."""

    def add_to_weight(self, component: str, path: str, delta: np.ndarray) -> None:
        """Add ``delta`` (PyTorch layout, float32) to the layer's weight, remembering the original once."""

    def restore_weight(self, component: str, path: str) -> None:
        """Put back the weight remembered by ``add_to_weight``, bit for bit."""

    def forget_weight(self, component: str, path: str) -> None:
        """Keep the current (fused) weight as the layer's own; the remembered original is dropped."""

    def lora_changed(self) -> None:
        """Called after every change (a backend re-traces compiled graphs here)."""


# ------------------------------------------------------------------------------------- reading
def resolve_lora_file(source: str | Path, weight_name: str | None = None, *,
                      local_files_only: bool = False) -> Path:
    """A LoRA file from a file path, a folder (``weight_name``, else its one weight file), a hub repo id
    with ``weight_name``, or ``owner/repo/path/in/repo.safetensors``."""
    path = Path(source).expanduser()
    if path.is_file():
        if weight_name is not None:
            raise ValueError(f"weight_name={weight_name!r} is for folders and hub repos; {path} is a file")
        return path
    if path.is_dir():
        return _file_in_folder(path, weight_name)
    text = str(source)
    parts = text.split("/")
    looks_local = text.startswith((".", "/", "~")) or (len(parts) == 2 and path.suffix in (SAFETENSORS_SUFFIX,
                                                                                          *PICKLE_SUFFIXES))
    if len(parts) < 2 or looks_local:
        raise ModelSourceError(f"LoRA {text!r} is not a file, a folder or a hub repo id")
    from huggingface_hub import hf_hub_download

    repo, inner = "/".join(parts[:2]), "/".join(parts[2:]) or weight_name or DEFAULT_WEIGHT_NAME
    try:
        return Path(hf_hub_download(repo, inner, local_files_only=local_files_only))
    except Exception as e:  # offline, unknown repo or file: one clear error
        raise ModelSourceError(f"could not get LoRA file {inner!r} from hub repo {repo!r}: {e}") from e


def _file_in_folder(folder: Path, weight_name: str | None) -> Path:
    if weight_name is not None:
        path = folder / weight_name
        if not path.is_file():
            raise ModelSourceError(f"LoRA folder {folder} has no file {weight_name!r}")
        return path
    if (folder / DEFAULT_WEIGHT_NAME).is_file():
        return folder / DEFAULT_WEIGHT_NAME
    files = sorted(p for p in folder.iterdir() if p.suffix in (SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES))
    if len(files) != 1:
        names = ", ".join(p.name for p in files) or "none"
        raise ModelSourceError(f"LoRA folder {folder}: pass weight_name= to choose a weight file (found: {names})")
    return files[0]


_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": np.uint16,
                       "I64": np.int64, "I32": np.int32}


def read_lora_tensors(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors as float32 numpy, safetensors metadata) of a LoRA file; pickles are read with
    ``torch.load(weights_only=True)`` (nothing executes). bfloat16 is widened here, so no framework is needed."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        state = load_torch_pickle(path)
        return {k: v.detach().float().cpu().numpy() for k, v in state.items()}, {}
    if path.suffix != SAFETENSORS_SUFFIX:
        raise WeightLoadError(f"{path}: unknown LoRA format {path.suffix!r} (expected .safetensors or .ckpt/.pt/.bin)")
    header = check_safetensors(path)
    out: dict[str, np.ndarray] = {}
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise WeightLoadError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
            start, end = info["data_offsets"]
            f.seek(8 + header_len + start)
            raw = np.frombuffer(f.read(end - start), dtype=dtype).reshape(info["shape"])
            if info["dtype"] == "BF16":
                raw = (raw.astype(np.uint32) << 16).view(np.float32)
            out[name] = raw.astype(np.float32)
    return out, dict(header.get("__metadata__") or {})


# ------------------------------------------------------------------------------------- parsing
@dataclass
class _Entry:
    component: str
    name: str  # the module as the file names it (kohya: underscores)
    kohya: bool
    parts: dict[str, tuple[str, np.ndarray]] = field(default_factory=dict)  # role -> (key, tensor)


def _split_key(key: str) -> tuple[str, str, bool]:
    """A key -> (component, the rest, kohya?)."""
    for prefix, component in KOHYA_PREFIXES.items():
        if key.startswith(prefix + "_") and "." in key:
            return component, key[len(prefix) + 1:], True
    rest = key.removeprefix("base_model.model.")
    head = rest.split(".", 1)[0]
    if head in DOTTED_PREFIXES and "." in rest:
        return DOTTED_PREFIXES[head], rest.split(".", 1)[1].removeprefix("base_model.model."), False
    return "unet", rest, False


def parse_lora_state(state: Mapping[str, np.ndarray], origin: str) -> list[_Entry]:
    """Group a LoRA state dict's keys by layer (component, module name), refusing what is not LoRA."""
    entries: dict[tuple[str, str], _Entry] = {}
    unknown: list[str] = []
    for key, value in state.items():
        for ending, kind in UNSUPPORTED.items():
            if key.endswith("." + ending):
                raise LoRAError(f"{origin}: key {key!r} is {kind}, which this version does not apply "
                                "(supported: LoRA and LyCORIS LoCon)")
        component, rest, kohya = _split_key(key)
        for pattern, role in KEY_FORMS:
            m = re.fullmatch(pattern, rest)
            if m:
                name = m.group(1)
                entry = entries.setdefault((component, name), _Entry(component, name, kohya))
                entry.parts[role] = (key, np.asarray(value, dtype=np.float32))
                break
        else:
            unknown.append(key)
    if unknown:
        raise LoRAError(f"{origin}: {len(unknown)} key(s) are not LoRA weights of a known format "
                        f"(kohya, LyCORIS LoCon, diffusers, PEFT): {_listing(unknown)}")
    for entry in entries.values():
        missing = [r for r in ("down", "up") if r not in entry.parts]
        if missing:
            have = next(iter(entry.parts.values()))[0]
            raise LoRAError(f"{origin}: {have!r} has no matching {' and '.join(missing)} matrix")
    if not entries:
        raise LoRAError(f"{origin} holds no LoRA weights")
    return list(entries.values())


def _listing(keys: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(repr(k) for k in list(keys)[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


# ------------------------------------------------------------------------------------ resolving
def _peft_alpha(metadata: Mapping[str, str], component: str, path: str, rank: int) -> float | None:
    """alpha (or rsLoRA's effective alpha) from diffusers' ``lora_adapter_metadata``; None when absent."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        return None
    get = lambda k, default=None: meta.get(f"{component}.{k}", meta.get(k, default))  # noqa: E731
    alpha = get("lora_alpha")
    if alpha is None:
        return None
    for pattern, value in (get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", path):
            alpha = value
            break
    if get("use_dora"):
        raise LoRAError(f"the {component} adapter in this file uses DoRA, which this version does not apply")
    return float(alpha) * (rank ** 0.5 if get("use_rslora") else 1.0)


def _fit(component: str, path: str, entry: _Entry, target: TargetLayer, origin: str, model: str) -> LoRALayer:
    (down_key, down), (_, up) = entry.parts["down"], entry.parts["up"]
    rank = down.shape[0]
    if up.ndim == 4 and up.shape[2:] == (1, 1):
        up = up[:, :, 0, 0]
    if down.ndim == 4 and not target.kernel and down.shape[2:] == (1, 1):
        down = down[:, :, 0, 0]  # a 1x1 convolution held as Linear
    if down.ndim == 2 and target.kernel == (1, 1):
        down = down[:, :, None, None]
    expected_down = (rank, target.in_features, *target.kernel)
    if down.shape != expected_down or up.shape != (target.out_features, rank):
        raise LoRAError(f"{origin}: {down_key!r} does not fit layer {path} of the "
                        f"{COMPONENT_LABELS.get(component, component)} of {model} (weight {target.out_features} x "
                        f"{target.in_features}"
                        f"{' x ' + 'x'.join(map(str, target.kernel)) if target.kernel else ''}): LoRA down "
                        f"{tuple(entry.parts['down'][1].shape)}, up {tuple(entry.parts['up'][1].shape)}; "
                        "a LoRA made for another model?")
    return LoRALayer(np.ascontiguousarray(down), np.ascontiguousarray(up), 1.0)


# diffusers UNet module names -> the original LDM UNet's (what kohya writes for LDM-trained models, e.g. SDXL).
LDM_RESNET_NAMES = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                    "conv_shortcut": "skip_connection"}
LDM_FIXED_NAMES = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
                   "time_embedding.linear_2": "time_embed.2"}


def ldm_unet_names(paths: Iterable[str]) -> dict[str, str]:
    """The LDM name (``input_blocks.4.1.proj_in``) of each diffusers UNet path, from the model's own layer
    list: block sizes are counted, not assumed (``layers_per_block`` may differ per block)."""
    paths = list(paths)
    count: dict[tuple[str, int], int] = {}  # (down|up, block) -> resnets
    attends: set[tuple[str, int]] = set()
    resamples: set[tuple[str, int]] = set()
    for p in paths:
        m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)", p)
        if m:
            key = (m.group(1), int(m.group(2)))
            if m.group(3) == "resnets":
                count[key] = max(count.get(key, 0), int(m.group(4)) + 1)
            elif m.group(3) == "attentions":
                attends.add(key)
            else:
                resamples.add(key)
    first: dict[tuple[str, int], int] = {}  # the LDM index of each block's first layer
    index = 1
    for b in range(sum(1 for k in count if k[0] == "down")):
        first[("down", b)], index = index, index + count[("down", b)] + (("down", b) in resamples)
    index = 0
    for b in range(sum(1 for k in count if k[0] == "up")):
        first[("up", b)], index = index, index + count[("up", b)]
    out: dict[str, str] = {}
    for p in paths:
        if p in LDM_FIXED_NAMES:
            out[p] = LDM_FIXED_NAMES[p]
            continue
        m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", p)
        mid = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", p)
        if mid:
            kind, j, rest = mid.group(1), int(mid.group(2)), mid.group(3)
            number = 1 if kind == "attentions" else 2 * j
            out[p] = f"middle_block.{number}.{LDM_RESNET_NAMES.get(rest, rest) if kind == 'resnets' else rest}"
        elif m and ".motion_modules." not in p:
            side, b, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
            root = "input_blocks" if side == "down" else "output_blocks"
            if kind == "resnets":
                out[p] = f"{root}.{first[(side, b)] + j}.0.{LDM_RESNET_NAMES.get(rest, rest)}"
            elif kind == "attentions":
                out[p] = f"{root}.{first[(side, b)] + j}.1.{rest}"
            elif kind == "downsamplers":
                out[p] = f"input_blocks.{first[(side, b)] + count[(side, b)]}.0.op"
            else:  # the upsampler follows the block's last layer (after its attention, if any)
                last = first[(side, b)] + count[(side, b)] - 1
                out[p] = f"output_blocks.{last}.{2 if (side, b) in attends else 1}.conv"
    return out


def _kohya_names(component: str, paths: Iterable[str]) -> dict[str, str]:
    """kohya's ``_``-joined name -> module path; for a UNet both the diffusers and the LDM block names."""
    paths = list(paths)
    names = {p.replace(".", "_"): p for p in paths}
    if component == "unet":
        names.update({ldm.replace(".", "_"): p for p, ldm in ldm_unet_names(paths).items()})
    return names


# The text-state width a UNet's cross-attention takes, per family (what a LoRA's attn2.to_k down matrix reads).
TEXT_WIDTHS = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL", 1280: "the SDXL refiner"}
_CROSS_KEY = re.compile(r"attn2[._]to_[kv]$")


def _refuse_other_family(entries: Sequence[_Entry], targets: Mapping[str, Mapping[str, TargetLayer]],
                         origin: str, model: str) -> None:
    """A LoRA trained for another family (SD 1.5 on SDXL, SDXL on SD 1.5) is refused naming why: its
    cross-attention reads text states of another width."""
    widths = {t.in_features for p, t in targets.get("unet", {}).items()
              if _CROSS_KEY.search(p) and "motion_modules" not in p}
    theirs = {e.parts["down"][1].shape[1] for e in entries if e.component == "unet" and _CROSS_KEY.search(e.name)
              and "motion" not in e.name and "temporal" not in e.name}
    if len(widths) == 1 and theirs and theirs != widths:
        (ours,), found = widths, sorted(theirs)

        def family(w: int) -> str:
            return f"{w}-wide ({TEXT_WIDTHS[w]})" if w in TEXT_WIDTHS else f"{w}-wide"

        raise LoRAError(f"{origin} is a LoRA for another model family: its UNet's cross-attention reads "
                        f"{', '.join(map(family, found))} text states, {model}'s reads {family(ours)} ones")


def resolve_adapter(entries: Sequence[_Entry], metadata: Mapping[str, str],
                    targets: Mapping[str, Mapping[str, TargetLayer]], name: str, origin: str,
                    model: str) -> LoRAAdapter:
    """Place every parsed layer on the model's layers; any key that fits none is an error naming it."""
    _refuse_other_family(entries, targets, origin, model)
    kohya_names = {c: _kohya_names(c, layers) for c, layers in targets.items()}
    layers: dict[str, dict[str, LoRALayer]] = {}
    unmatched: list[str] = []
    absent: dict[str, list[str]] = {}
    for entry in entries:
        key = entry.parts["down"][0]
        if entry.component not in targets:
            absent.setdefault(entry.component, []).append(key)
            continue
        path = kohya_names[entry.component].get(entry.name) if entry.kohya else _dotted_path(entry, targets)
        if path is None:
            unmatched.append(key)
            continue
        layer = _fit(entry.component, path, entry, targets[entry.component][path], origin, model)
        alpha = entry.parts["alpha"][1] if "alpha" in entry.parts else None
        alpha = float(np.asarray(alpha).reshape(-1)[0]) if alpha is not None else \
            _peft_alpha(metadata, entry.component, path, layer.rank)
        scale = 1.0 if alpha is None else alpha / layer.rank
        layers.setdefault(entry.component, {})[path] = LoRALayer(layer.down, layer.up, scale)
    if absent:
        what = "; ".join(f"{COMPONENT_LABELS.get(c, c)} ({c}): {_listing(keys, 3)}" for c, keys in absent.items())
        raise LoRAError(f"{origin} has weights for networks {model} does not have: {what}")
    if unmatched:
        raise LoRAError(f"{origin}: {len(unmatched)} of {len(entries)} LoRA layers match no layer of {model} "
                        f"(a LoRA for another model, e.g. SDXL?): {_listing(unmatched)}")
    return LoRAAdapter(name, origin, layers)


def _dotted_path(entry: _Entry, targets: Mapping[str, Mapping[str, TargetLayer]]) -> str | None:
    known = targets[entry.component]
    path = entry.name
    if path in known:
        return path
    if entry.component == "unet" and ".temporal_transformer." in path:  # an original AnimateDiff MotionLoRA
        from .motion_adapters import MOTION_RULES

        path = next((mapped for matched, mapped in (r.apply(path) for r in MOTION_RULES) if matched), path)
    for pattern, replacement in PATH_ALIASES.get(entry.component, ()):
        path = re.sub(pattern, replacement, path)
    return path if path in known else None


# --------------------------------------------------------------------------------- the adapters
class LoRAState:
    """The LoRA adapters of one loaded model, kept with its backend, so every pipeline sharing the model
    (``from_pipeline``) sees the same adapters, exactly as it sees the same weights.

    Unfused (the default), each patched layer computes ``base(x) + sum_i w_i * s_i * up_i(down_i(x))`` over the
    active adapters (weights ``w_i`` from ``set_adapters``, ``s_i`` = alpha / rank): works on quantized layers,
    and changing weights costs nothing. Fused, the same sum is added into the weights (the originals kept, so
    ``unfuse`` restores them exactly) and the layers run as plain layers."""

    def __init__(self, host: LoRAHost, model: str) -> None:
        self.host, self.model = host, model
        self.adapters: dict[str, LoRAAdapter] = {}
        self.active: dict[str, float] = {}  # adapter -> weight, in set_adapters order
        self.fused: list[tuple[str, str]] | None = None  # (component, path) of the fused layers
        self.baked: set[str] = set()  # components whose fused weights were kept by unload()
        self.enabled = True  # disable_lora() / enable_lora()
        self._patched: set[tuple[str, str]] = set()
        self._targets: dict[str, dict[str, TargetLayer]] | None = None

    def targets(self) -> dict[str, dict[str, TargetLayer]]:
        if self._targets is None:
            self._targets = self.host.lora_targets()
        return self._targets

    # ------------------------------------------------------------------------------- changes
    def load(self, state: Mapping[str, np.ndarray], metadata: Mapping[str, str], origin: str,
             adapter_name: str | None = None) -> LoRAAdapter:
        if adapter_name is None:
            adapter_name = next(f"default_{i}" for i in range(len(self.adapters) + 1)
                                if f"default_{i}" not in self.adapters)
        if adapter_name in self.adapters:
            raise ValueError(f"an adapter named {adapter_name!r} is already loaded (loaded: {list(self.adapters)}); "
                             "pass another adapter_name or delete_adapters() it first")
        self._refuse_while_fused("load_lora_weights")
        adapter = resolve_adapter(parse_lora_state(state, origin), metadata, self.targets(), adapter_name, origin,
                                  self.model)
        self.adapters[adapter_name] = adapter
        self.active = {adapter_name: 1.0}  # as diffusers: the adapter just loaded is the one active
        counts = ", ".join(f"{len(v)} {COMPONENT_LABELS.get(c, c)}" for c, v in adapter.layers.items())
        logger.info("LoRA %r from %s: patched %d layers of %s (%s)", adapter_name, origin, adapter.layer_count,
                    self.model, counts)
        self.refresh()
        return adapter

    def set_adapters(self, names: str | Sequence[str], weights: float | Sequence[float | None] | None = None) -> None:
        names = [names] if isinstance(names, str) else list(names)
        if weights is None or isinstance(weights, (int, float)):
            weights = [1.0 if weights is None else float(weights)] * len(names)
        weights = [1.0 if w is None else w for w in weights]
        if len(weights) != len(names):
            raise ValueError(f"set_adapters: {len(names)} adapter names but {len(weights)} weights")
        self._known(names)
        for w in weights:
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not np.isfinite(w):
                raise ValueError(f"set_adapters: adapter weights must be finite numbers, got {w!r}")
        self._refuse_while_fused("set_adapters")
        self.active = {n: float(w) for n, w in zip(names, weights)}
        self.refresh()

    def delete(self, names: str | Sequence[str]) -> None:
        names = [names] if isinstance(names, str) else list(names)
        self._known(names)
        self._refuse_while_fused("delete_adapters")
        for n in names:
            del self.adapters[n]
            self.active.pop(n, None)
        self.refresh()

    def unload(self) -> None:
        """Remove every adapter; fused weights stay fused (diffusers' fuse_lora + unload_lora_weights)."""
        if self.fused is not None:
            for component, path in self.fused:
                self.host.forget_weight(component, path)
            self.baked |= self.fused_components
            self.fused = None
        self.adapters.clear()
        self.active.clear()
        self.refresh()

    def fuse(self, lora_scale: float = 1.0, adapter_names: Sequence[str] | None = None) -> int:
        if self.fused is not None:
            raise RuntimeError("the LoRA weights are fused already; unfuse_lora() first")
        if not isinstance(lora_scale, (int, float)) or not np.isfinite(lora_scale):
            raise ValueError(f"fuse_lora: lora_scale must be a finite number, got {lora_scale!r}")
        if adapter_names is None:
            chosen = dict(self.active) if self.enabled else {}
        else:
            self._known(adapter_names)
            chosen = {n: self.active.get(n, 1.0) for n in adapter_names}
        if not chosen:
            raise ValueError("fuse_lora: no active LoRA adapter to fuse (load_lora_weights or set_adapters first)")
        sums = self._deltas(chosen, float(lora_scale))
        quantized = [f"{c}:{p}" for c, p in sums if self.targets()[c][p].quantized]
        if quantized:
            raise RuntimeError(f"fuse_lora: {len(quantized)} patched layers are quantized ({_listing(quantized, 3)}); "
                               "a quantized weight cannot take an exact sum: run the LoRA unfused there")
        for (component, path), delta in sums.items():
            self.host.add_to_weight(component, path, delta)
        self.fused = list(sums)
        self.refresh()
        logger.info("LoRA: fused %d layers of %s", len(sums), self.model)
        return len(sums)

    def unfuse(self) -> None:
        if self.fused is None:
            return
        for component, path in self.fused:
            self.host.restore_weight(component, path)
        self.fused = None
        self.refresh()

    def refresh(self) -> None:
        """Attach the unfused terms the state asks for (none while fused); called after every change and by
        a backend whose layers were replaced (quantize)."""
        self._targets = None
        self.targets()  # the host reads its layers afresh
        wanted: dict[tuple[str, str], list[LoRATerm]] = {}
        if self.fused is None and self.enabled:
            for name, weight in self.active.items():
                for component, layers in self.adapters[name].layers.items():
                    for path, layer in layers.items():
                        wanted.setdefault((component, path), []).append(
                            LoRATerm(layer.down, layer.up, weight * layer.scale))
        for component, path in self._patched - set(wanted):
            self.host.set_terms(component, path, [])
        for (component, path), terms in wanted.items():
            self.host.set_terms(component, path, terms)
        self._patched = set(wanted)
        self.host.lora_changed()

    # ------------------------------------------------------------------------------- queries
    @property
    def fused_components(self) -> set[str]:
        return {c for c, _ in self.fused or ()}

    @property
    def changed_components(self) -> set[str]:
        """Components whose weights differ from the loaded files (fused now, or fused and kept)."""
        return self.fused_components | self.baked

    def set_enabled(self, enabled: bool) -> None:
        self.enabled = bool(enabled)
        self.refresh()

    def _deltas(self, weights: Mapping[str, float], lora_scale: float) -> dict[tuple[str, str], np.ndarray]:
        sums: dict[tuple[str, str], np.ndarray] = {}
        for name, weight in weights.items():
            for component, layers in self.adapters[name].layers.items():
                for path, layer in layers.items():
                    d = np.float32(weight * lora_scale) * layer.delta()
                    sums[(component, path)] = sums[(component, path)] + d if (component, path) in sums else d
        return sums

    def _known(self, names: Iterable[str]) -> None:
        unknown = [n for n in names if n not in self.adapters]
        if unknown:
            raise ValueError(f"no LoRA adapter named {', '.join(map(repr, unknown))} is loaded "
                             f"(loaded: {list(self.adapters) or 'none'})")

    def _refuse_while_fused(self, what: str) -> None:
        if self.fused is not None:
            raise RuntimeError(f"{what}: the LoRA weights are fused; unfuse_lora() first")


def load_lora_source(source: Any, weight_name: str | None = None, *,
                     local_files_only: bool = False) -> tuple[dict[str, np.ndarray], dict[str, str], str]:
    """(tensors, metadata, origin) from a path, folder, hub id, or an in-memory state dict
    (numpy, torch or MLX arrays)."""
    if isinstance(source, Mapping):
        return {str(k): _as_numpy(v) for k, v in source.items()}, {}, "the given LoRA state dict"
    path = resolve_lora_file(source, weight_name, local_files_only=local_files_only)
    tensors, metadata = read_lora_tensors(path)
    return tensors, metadata, str(path)


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch
        return value.detach().float().cpu().numpy()
    return np.asarray(value, dtype=np.float32)
