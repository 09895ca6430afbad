"""IP-Adapter files as data: where the weight file and its image encoder are, their tensors read safely,
the architecture read from the tensors and checked against the UNet before anything is attached.

The layout is h94/IP-Adapter's: one file (``ip-adapter_sd15.safetensors`` or ``.bin``) holding
``image_proj.*`` (the image projection: CLIP image embedding -> a few tokens of the UNet's
cross-attention width) and ``ip_adapter.<id>.to_k_ip.weight`` / ``to_v_ip.weight`` (the decoupled
cross-attention's key and value projections, one pair per cross-attention layer, ids 1, 3, 5, ... over
the UNet's attention layers in diffusers' ``attn_processors`` order: down blocks, up blocks, mid block);
the image encoder (transformers' CLIPVisionModelWithProjection) in ``image_encoder`` beside the file.
A ``.bin`` is read with the weights-only unpickler (``checkpoint_io``): nothing in it is executed.
The framework parts (modules, attaching them) are ``backends/*/ip_adapter.py``. No framework here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping

import numpy as np

from .checkpoint_io import PICKLE_SUFFIXES, SAFETENSORS_SUFFIX, load_pickle_object
from .errors import IPAdapterError, ModelSourceError, UnsupportedModelError, WeightLoadError
from .topology import UNetPlan

IMAGE_PROJ, IP_ADAPTER = "image_proj", "ip_adapter"
IMAGE_ENCODER_FOLDER = "image_encoder"  # diffusers' default ``image_encoder_folder``
ENCODER_FILES = ("config.json",)
ENCODER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
TOKENS_PER_IMAGE = 4  # the plain IP-Adapter's image tokens (diffusers builds every such projection with 4)


# ------------------------------------------------------------------------------------ the UNet side
@dataclass(frozen=True)
class CrossAttentionSlot:
    """One cross-attention layer (``attn2``) an IP-Adapter adds its key/value projections to."""

    path: str  # the attention module, diffusers-named: down_blocks.0.attentions.1.transformer_blocks.0.attn2
    key_id: int  # its number in the adapter file (``ip_adapter.<key_id>.to_k_ip.weight``)
    inner: int  # heads x head_dim: to_k_ip's output width
    heads: int
    head_dim: int


def cross_attention_slots(plan: UNetPlan) -> list[CrossAttentionSlot]:
    """The UNet's cross-attention layers in the order adapter files number them (diffusers' module
    registration order: every down block, every up block, then the mid block), ids 1, 3, 5, ...
    (attn1 and attn2 alternate in that numbering; motion modules are not counted)."""
    blocks: list[tuple[str, Any, int]] = [(f"down_blocks.{i}", b, len(b.resnets))
                                          for i, b in enumerate(plan.down_blocks)]
    blocks += [(f"up_blocks.{i}", b, len(b.resnets)) for i, b in enumerate(plan.up_blocks)]
    if plan.mid_block is not None:
        blocks.append(("mid_block", plan.mid_block, 1))
    slots: list[CrossAttentionSlot] = []
    for prefix, block, carriers in blocks:
        attention = block.attention
        if attention is None:
            continue
        for j in range(carriers):
            for t in range(attention.layers):
                slots.append(CrossAttentionSlot(f"{prefix}.attentions.{j}.transformer_blocks.{t}.attn2",
                                                2 * len(slots) + 1, attention.heads * attention.head_dim,
                                                attention.heads, attention.head_dim))
    return slots


# ------------------------------------------------------------------------------------- the adapter
@dataclass(frozen=True)
class ImageProjectionSpec:
    """diffusers' ImageProjection (IP-Adapter, IP-Adapter for SDXL): a Linear from the CLIP image embedding
    to ``num_tokens`` x ``cross_attention_dim``, then a LayerNorm over each token."""

    image_embed_dim: int
    cross_attention_dim: int
    num_tokens: int

    hidden_states: ClassVar[bool] = False  # it takes the encoder's image_embeds


@dataclass(frozen=True)
class ResamplerSpec:
    """diffusers' IPAdapterPlusImageProjection (IP-Adapter Plus's perceiver resampler): ``num_tokens`` learned
    queries attend ``depth`` times over the image encoder's penultimate hidden states (``proj_in`` to
    ``hidden_dims``) and their own, each layer followed by a GELU feed-forward; ``proj_out`` and a LayerNorm
    bring them to the cross-attention width. Heads of 64 channels, as diffusers reads them."""

    image_embed_dim: int  # the encoder's hidden size (proj_in's input)
    hidden_dims: int
    cross_attention_dim: int
    num_tokens: int
    depth: int
    heads: int
    ff_inner: int
    dim_head: ClassVar[int] = 64

    hidden_states: ClassVar[bool] = True  # it takes the encoder's penultimate hidden states


@dataclass(frozen=True)
class IPAdapterWeights:
    """One IP-Adapter, parsed: its image projection (diffusers' module names) and, per cross-attention layer
    path, the (to_k_ip, to_v_ip) weights; float32 numpy."""

    origin: str
    projection: ImageProjectionSpec | ResamplerSpec
    image_proj: dict[str, np.ndarray]
    layers: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return self.projection.num_tokens


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch
        return value.detach().float().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


def read_ip_adapter_file(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """``{"image_proj": {...}, "ip_adapter": {...}}`` from a .safetensors file (prefixed keys) or a .bin
    (nested dicts, read weights-only)."""
    if path.suffix == SAFETENSORS_SUFFIX:
        from .lora import read_lora_tensors  # a plain float32 numpy safetensors reader (bf16 widened)

        flat, _ = read_lora_tensors(path)
    elif path.suffix in PICKLE_SUFFIXES:
        state = load_pickle_object(path)
        if not isinstance(state, dict):
            raise WeightLoadError(f"{path} does not hold a dictionary")
        flat = {}
        for group, tensors in state.items():
            if isinstance(tensors, dict):
                flat.update({f"{group}.{k}": v for k, v in tensors.items()})
            else:
                flat[str(group)] = tensors
    else:
        raise WeightLoadError(f"{path}: unknown IP-Adapter format {path.suffix!r} (expected .safetensors or .bin)")
    return split_state(flat, str(path))


def split_state(flat: Mapping[str, Any], origin: str) -> dict[str, dict[str, np.ndarray]]:
    """Flat ``image_proj.*`` / ``ip_adapter.*`` keys -> the two groups; any other key is refused by name."""
    groups: dict[str, dict[str, np.ndarray]] = {IMAGE_PROJ: {}, IP_ADAPTER: {}}
    other = []
    for key, value in flat.items():
        group, _, rest = str(key).partition(".")
        if group in groups and rest:
            groups[group][rest] = _as_numpy(value)
        else:
            other.append(key)
    if not groups[IMAGE_PROJ] or not groups[IP_ADAPTER]:
        raise WeightLoadError(f"{origin} is not an IP-Adapter: it needs image_proj.* and ip_adapter.* keys "
                              f"(h94/IP-Adapter's layout)")
    if other:
        raise WeightLoadError(f"{origin}: keys outside image_proj.* and ip_adapter.*: {sorted(other)[:8]} (an "
                              "IP-Adapter FaceID with its LoRA is not supported)")
    return groups


# The original IP-Adapter Plus resampler's keys -> diffusers' IPAdapterPlusImageProjection names (as its
# _convert_ip_adapter_image_proj_to_diffusers maps them); to_kv is split into to_k and to_v.
RESAMPLER_KEYS = (
    (r"layers\.(\d+)\.0\.norm1\.(weight|bias)", r"layers.\1.ln0.\2"),
    (r"layers\.(\d+)\.0\.norm2\.(weight|bias)", r"layers.\1.ln1.\2"),
    (r"layers\.(\d+)\.0\.to_q\.weight", r"layers.\1.attn.to_q.weight"),
    (r"layers\.(\d+)\.0\.to_kv\.weight", r"layers.\1.attn.to_kv.weight"),
    (r"layers\.(\d+)\.0\.to_out\.weight", r"layers.\1.attn.to_out.0.weight"),
    (r"layers\.(\d+)\.1\.0\.(weight|bias)", r"layers.\1.ff.0.\2"),
    (r"layers\.(\d+)\.1\.1\.weight", r"layers.\1.ff.1.net.0.proj.weight"),
    (r"layers\.(\d+)\.1\.3\.weight", r"layers.\1.ff.1.net.2.weight"),
    (r"(latents|(?:proj_in|proj_out|norm_out)\.(?:weight|bias))", r"\1"),
)


def resampler_spec(image_proj: Mapping[str, np.ndarray], origin: str) -> tuple[ResamplerSpec, dict]:
    """IP-Adapter Plus: the resampler's architecture from its tensors, its weights under diffusers' names."""
    weights: dict[str, np.ndarray] = {}
    for key, value in image_proj.items():
        for pattern, target in RESAMPLER_KEYS:
            m = re.fullmatch(pattern, key)
            if m:
                name = m.expand(target)
                break
        else:
            raise UnsupportedModelError(f"{origin}: image_proj.{key} is not a key of IP-Adapter Plus's resampler "
                                        "(FaceID Plus and other variants are not supported)")
        if name.endswith("to_kv.weight"):
            k, v = np.split(value, 2, axis=0)
            weights[name.replace("to_kv", "to_k")], weights[name.replace("to_kv", "to_v")] = k, v
        else:
            weights[name] = value
    try:
        latents, q = weights["latents"], weights["layers.0.attn.to_q.weight"]
        spec = ResamplerSpec(image_embed_dim=int(weights["proj_in.weight"].shape[1]), hidden_dims=int(latents.shape[2]),
                             cross_attention_dim=int(weights["proj_out.weight"].shape[0]),
                             num_tokens=int(latents.shape[1]),
                             depth=len({k.split(".")[1] for k in weights if k.startswith("layers.")}),
                             heads=int(q.shape[0]) // ResamplerSpec.dim_head,
                             ff_inner=int(weights["layers.0.ff.1.net.0.proj.weight"].shape[0]))
    except (KeyError, IndexError) as e:
        raise WeightLoadError(f"{origin}: an IP-Adapter Plus resampler without {e}") from None
    if spec.heads < 1 or q.shape[0] % ResamplerSpec.dim_head:
        raise UnsupportedModelError(f"{origin}: the resampler's to_q has {q.shape[0]} rows, not heads of "
                                    f"{ResamplerSpec.dim_head} channels (diffusers' reading)")
    return spec, weights


def projection_spec(image_proj: Mapping[str, np.ndarray], origin: str
                    ) -> tuple[ImageProjectionSpec | ResamplerSpec, dict]:
    """The projection's architecture from its tensors, and its weights under diffusers' module names."""
    if "latents" in image_proj:
        return resampler_spec(image_proj, origin)
    expected = {"proj.weight", "proj.bias", "norm.weight", "norm.bias"}
    if set(image_proj) != expected:
        raise UnsupportedModelError(f"{origin}: image_proj holds {sorted(image_proj)[:6]}; an IP-Adapter's image "
                                    f"projection has {sorted(expected)}, a Plus one latents, proj_in, layers.* "
                                    "(Full-face and FaceID variants are not supported)")
    rows, embed_dim = image_proj["proj.weight"].shape
    width = image_proj["norm.weight"].shape[0]
    if rows % width:
        raise WeightLoadError(f"{origin}: image_proj.proj.weight has {rows} rows, not a multiple of the "
                              f"{width}-wide tokens image_proj.norm normalises")
    spec = ImageProjectionSpec(int(embed_dim), int(width), rows // width)
    weights = {("image_embeds." + k[len("proj."):] if k.startswith("proj.") else k): v for k, v in image_proj.items()}
    return spec, weights


def parse_ip_adapter(groups: Mapping[str, Mapping[str, np.ndarray]], origin: str,
                     plan: UNetPlan, cross_attention_dim: int) -> IPAdapterWeights:
    """Check an adapter's tensors against this UNet (cross-attention width, layer count, shapes), naming
    the mismatch, and assign its layer weights to the UNet's cross-attention paths."""
    spec, image_proj = projection_spec(groups[IMAGE_PROJ], origin)
    if spec.cross_attention_dim != cross_attention_dim:
        raise IPAdapterError(
            f"{origin} was made for another base model: its image tokens are {spec.cross_attention_dim} wide "
            f"(image_proj), this UNet cross-attends to {cross_attention_dim}-wide text "
            "(768: SD 1.x, 1024: SD 2.x, 2048: SDXL)")
    slots = cross_attention_slots(plan)
    attn = groups[IP_ADAPTER]
    wanted = {f"{s.key_id}.{name}.weight" for s in slots for name in ("to_k_ip", "to_v_ip")}
    if set(attn) != wanted:
        found = len({k.split(".", 1)[0] for k in attn})
        raise IPAdapterError(
            f"{origin} was made for another UNet: it has decoupled attention weights for {found} cross-attention "
            f"layers, this UNet has {len(slots)} (missing: {sorted(wanted - set(attn))[:4]}, unexpected: "
            f"{sorted(set(attn) - wanted)[:4]})")
    layers: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for s in slots:
        k, v = attn[f"{s.key_id}.to_k_ip.weight"], attn[f"{s.key_id}.to_v_ip.weight"]
        for name, w in (("to_k_ip", k), ("to_v_ip", v)):
            if tuple(w.shape) != (s.inner, cross_attention_dim):
                raise IPAdapterError(f"{origin}: ip_adapter.{s.key_id}.{name}.weight has shape {tuple(w.shape)}; "
                                     f"{s.path} needs {(s.inner, cross_attention_dim)}")
        layers[s.path] = (k, v)
    return IPAdapterWeights(origin, spec, image_proj, layers)


# ------------------------------------------------------------------------------------------ sources
@dataclass(frozen=True)
class IPAdapterFiles:
    weights: Path | None  # None: an in-memory state dict
    image_encoder: Path | None  # the image encoder folder (None: not asked for)
    origin: str


def _encoder_subfolder(subfolder: str | None, image_encoder_folder: str) -> str:
    """diffusers' rule: a bare folder name is inside ``subfolder``; a path with '/' is from the repo root."""
    if "/" in image_encoder_folder:
        return image_encoder_folder
    return f"{subfolder.strip('/')}/{image_encoder_folder}" if subfolder else image_encoder_folder


def _weight_in_folder(folder: Path, weight_name: str | None) -> Path:
    if weight_name is not None:
        path = folder / weight_name
        if not path.is_file():
            raise ModelSourceError(f"IP-Adapter folder {folder} has no file {weight_name!r}")
        return path
    files = sorted(p for p in folder.iterdir() if p.suffix in (SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES))
    if len(files) != 1:
        raise ModelSourceError(f"IP-Adapter folder {folder}: pass weight_name= to choose a weight file (found: "
                               f"{', '.join(p.name for p in files) or 'none'})")
    return files[0]


def resolve_ip_adapter(source: str | Path, subfolder: str | None = None, weight_name: str | None = None,
                       image_encoder_folder: str | None = IMAGE_ENCODER_FOLDER, *,
                       local_files_only: bool = False) -> IPAdapterFiles:
    """The weight file and the image encoder folder of an IP-Adapter given as a file, a folder (``subfolder``,
    ``weight_name``) or a hub repo (``"h94/IP-Adapter"``, ``subfolder="models"``,
    ``weight_name="ip-adapter_sd15.safetensors"``). The encoder folder is checked to exist here (its
    absence is named), its contents when it loads."""
    path = Path(source).expanduser()
    if path.is_file():
        if weight_name is not None or subfolder is not None:
            raise ValueError(f"subfolder= and weight_name= are for folders and hub repos; {path} is a file")
        encoder = None if image_encoder_folder is None else (
            path.parent / image_encoder_folder if "/" not in image_encoder_folder else Path(image_encoder_folder))
        return IPAdapterFiles(path, _checked_encoder(encoder, str(path)), str(path))
    if path.is_dir():
        weights = _weight_in_folder(path / subfolder if subfolder else path, weight_name)
        encoder = None if image_encoder_folder is None else path / _encoder_subfolder(subfolder, image_encoder_folder)
        return IPAdapterFiles(weights, _checked_encoder(encoder, str(weights)), str(weights))
    text = str(source)
    if len(text.split("/")) != 2 or text.startswith((".", "/", "~")):
        raise ModelSourceError(f"IP-Adapter {text!r} is not a file, a folder or a hub repo id")
    if weight_name is None:
        raise ValueError(f"IP-Adapter hub repo {text!r}: pass weight_name= (e.g. 'ip-adapter_sd15.safetensors')")
    from huggingface_hub import hf_hub_download

    inner = f"{subfolder.strip('/')}/{weight_name}" if subfolder else weight_name
    try:
        weights = Path(hf_hub_download(text, inner, local_files_only=local_files_only))
    except Exception as e:  # offline, unknown repo or file: one clear error
        raise ModelSourceError(f"could not get IP-Adapter file {inner!r} from hub repo {text!r}: {e}") from e
    encoder = None
    if image_encoder_folder is not None:
        folder = _encoder_subfolder(subfolder, image_encoder_folder)
        encoder = _hub_encoder(text, folder, local_files_only)
    return IPAdapterFiles(weights, encoder, f"{text}/{inner}")


def _hub_encoder(repo: str, folder: str, local_files_only: bool) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        config = Path(hf_hub_download(repo, f"{folder}/config.json", local_files_only=local_files_only))
    except Exception as e:
        raise ModelSourceError(f"IP-Adapter {repo!r} has no image encoder at {folder!r} ({folder}/config.json: "
                               f"{e}); pass image_encoder_folder= to name it") from e
    for name in ENCODER_WEIGHTS:
        try:
            hf_hub_download(repo, f"{folder}/{name}", local_files_only=local_files_only)
            return config.parent
        except Exception:
            continue
    raise ModelSourceError(f"IP-Adapter {repo!r}: the image encoder folder {folder!r} has no "
                           f"{' or '.join(ENCODER_WEIGHTS)}")


def _checked_encoder(folder: Path | None, origin: str) -> Path | None:
    if folder is None:
        return None
    if not (folder / "config.json").is_file():
        raise ModelSourceError(
            f"the IP-Adapter {origin} has no image encoder: {folder} (its image_encoder folder, a transformers "
            "CLIPVisionModelWithProjection with config.json and model.safetensors) is missing. Put it there, pass "
            "image_encoder_folder= to name another, or image_encoder_folder=None to use ip_adapter_image_embeds only")
    return folder


def check_encoder_fits(encoder_config: Any, spec: ImageProjectionSpec | ResamplerSpec, encoder: Path,
                       origin: str) -> None:
    """The image encoder's output width (image_embeds; Plus: hidden states) must be what the projection takes."""
    width = encoder_config.hidden_size if spec.hidden_states else encoder_config.projection_dim
    what = "hidden states" if spec.hidden_states else "image embeddings"
    if width != spec.image_embed_dim:
        raise IPAdapterError(
            f"the image encoder {encoder} gives {width}-wide {what}, but the IP-Adapter {origin} projects "
            f"{spec.image_embed_dim}-wide ones (ViT-H/14: 1024 embeddings, 1280 hidden; ViT-bigG/14: 1280, 1664); "
            "use the image_encoder folder the adapter was trained with")
