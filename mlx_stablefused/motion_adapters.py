"""AnimateDiff motion adapters: find them, read their weights safely, and name them as diffusers does.

Accepted: a diffusers ``MotionAdapter`` folder or hub repo (``guoyww/animatediff-motion-adapter-v1-5-2``),
or a single checkpoint in the original format (``mm_sd_v15_v2.ckpt``, ``v3_sd15_mm.ckpt`` and their
.safetensors forms) or in diffusers' naming, locally or as ``owner/repo/file.ckpt`` on the hub.
Original checkpoints are renamed key by key (a table of rules), their ``pos_encoder.pe`` buffers
dropped (the table is recomputed), and the adapter's shape (channels, layers, mid-block module,
maximum frame count) inferred from the tensors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from .config import MotionConfig, read_json
from .errors import ModelSourceError, WeightLoadError
from .sources import is_special_id
from .weights import Rule, map_keys

_P = r"((?:down_blocks|up_blocks)\.\d+\.motion_modules\.\d+|mid_block\.motion_modules\.\d+)"
_TB = r"\.temporal_transformer\.transformer_blocks\.(\d+)\."
# Original AnimateDiff key -> diffusers MotionAdapter key (first match wins; None drops the buffer).
MOTION_RULES = [
    Rule(r".*\.pos_encoder\.pe", None),
    Rule(r".*\.pos_embed\.pe", None),
    Rule(_P + r"\.temporal_transformer\.(norm|proj_in|proj_out)\.(weight|bias)", r"\1.\2.\3"),
    Rule(_P + _TB + r"attention_blocks\.0\.(.*)", r"\1.transformer_blocks.\2.attn1.\3"),
    Rule(_P + _TB + r"attention_blocks\.1\.(.*)", r"\1.transformer_blocks.\2.attn2.\3"),
    Rule(_P + _TB + r"norms\.0\.(weight|bias)", r"\1.transformer_blocks.\2.norm1.\3"),
    Rule(_P + _TB + r"norms\.1\.(weight|bias)", r"\1.transformer_blocks.\2.norm2.\3"),
    Rule(_P + _TB + r"ff_norm\.(weight|bias)", r"\1.transformer_blocks.\2.norm3.\3"),
    Rule(_P + _TB + r"(ff\..*)", r"\1.transformer_blocks.\2.\3"),
]
WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class MotionAdapterSource:
    files: tuple[Path, ...]
    config: MotionConfig | None  # None: infer from the checkpoint's tensors
    origin: str
    overrides: tuple = ()  # diffusers MotionAdapter config entries that override inferred ones


def resolve_motion_adapter(spec: str | Path, *, variant: str | None = None, local_files_only: bool = False,
                           config: Mapping[str, Any] | None = None) -> MotionAdapterSource:
    """Locate an adapter given as a folder, a file, a hub repo id, or ``owner/repo/path/in/repo``.

    ``config``: MotionAdapter config entries for single-file checkpoints, which store no config; the
    rest is inferred from the tensors (attention heads cannot be, and default to SD 1.5's 8).
    """
    source = _locate(spec, variant, local_files_only)
    if config:
        if source.config is not None:
            raise ValueError("config= is for single-file checkpoints; this adapter folder has its own config.json")
        return MotionAdapterSource(source.files, None, source.origin, tuple(sorted(dict(config).items())))
    return source


def _locate(spec: str | Path, variant: str | None, local_files_only: bool) -> MotionAdapterSource:
    if is_special_id(spec):  # no files yet: the entry layer builds it (mlx_stablefused.demo.resolve_special_adapter)
        return MotionAdapterSource((), None, str(spec))
    path = Path(spec).expanduser()
    if path.is_file():
        return _file_source(path, str(spec))
    if path.is_dir():
        return _folder_source(path, variant, str(spec))
    text = str(spec)
    parts = text.split("/")
    if len(parts) < 2 or text.startswith((".", "/", "~")):
        raise ModelSourceError(f"motion adapter {text!r} is not a file, a folder or a hub repo id")
    from huggingface_hub import hf_hub_download, snapshot_download

    repo = "/".join(parts[:2])
    try:
        if len(parts) > 2:
            local = hf_hub_download(repo, "/".join(parts[2:]), local_files_only=local_files_only)
            return _file_source(Path(local), text)
        patterns = ["config.json", "diffusion_pytorch_model*.safetensors"]
        folder = snapshot_download(repo, allow_patterns=patterns, local_files_only=local_files_only)
    except Exception as e:  # network and hub errors come in many types
        raise ModelSourceError(f"could not get motion adapter {text!r} from the Hugging Face Hub ({e}); pass a "
                               "local folder or checkpoint file instead") from e
    return _folder_source(Path(folder), variant, text)


def _file_source(path: Path, origin: str) -> MotionAdapterSource:
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ModelSourceError(f"{path}: not a motion-module checkpoint (expected one of {WEIGHT_SUFFIXES})")
    return MotionAdapterSource((path,), None, origin)


def _folder_source(folder: Path, variant: str | None, origin: str) -> MotionAdapterSource:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelSourceError(f"{folder} has no config.json; is it a diffusers MotionAdapter folder?")
    names = ([f"diffusion_pytorch_model.{variant}.safetensors"] if variant else []) + [
        "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"]
    for name in names:
        if (folder / name).is_file():
            return MotionAdapterSource((folder / name,), MotionConfig.from_dict(read_json(config_file)), origin)
    raise ModelSourceError(f"no motion adapter weights in {folder} (looked for {names})")


def motion_state(source: MotionAdapterSource, read: Callable[[Path], dict]) -> tuple[dict, MotionConfig]:
    """Weights renamed to diffusers' motion-module keys, and the adapter config (inferred if needed)."""
    if not source.files and is_special_id(source.origin):
        raise ModelSourceError(f"motion adapter {source.origin!r} is a special id; resolve it first "
                               "(mlx_stablefused.demo.resolve_special_adapter)")
    raw: dict[str, Any] = {}
    for f in source.files:
        raw.update(read(f))
    if not raw:
        raise WeightLoadError(f"{source.origin} holds no tensors")
    pe_lengths = {int(v.shape[1]) for k, v in raw.items() if k.endswith(".pe") and len(v.shape) == 3}
    stray = sorted(k for k in raw if "motion_modules." not in k)
    if stray:
        shown = ", ".join(repr(k) for k in stray[:8])
        raise WeightLoadError(f"{source.origin} has {len(stray)} keys that are not motion-module weights: {shown}")
    state = map_keys(raw, MOTION_RULES)
    if source.config is not None:
        return state, source.config
    inferred = infer_motion_config({k: tuple(v.shape) for k, v in state.items()},
                                   max(pe_lengths) if pe_lengths else 32)
    return state, MotionConfig.from_dict({**inferred, **dict(source.overrides)})


def infer_motion_config(shapes: Mapping[str, tuple[int, ...]], max_seq_length: int) -> dict[str, Any]:
    """A MotionAdapter config from diffusers-named tensor shapes (original checkpoints carry none)."""
    down: dict[int, set[int]] = {}
    channels: dict[int, int] = {}
    layers: dict[int, set[int]] = {}
    for key, shape in shapes.items():
        m = re.match(r"down_blocks\.(\d+)\.motion_modules\.(\d+)\.(.*)", key)
        if not m:
            continue
        i, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        down.setdefault(i, set()).add(j)
        if rest == "norm.weight":
            channels[i] = shape[0]
        t = re.match(r"transformer_blocks\.(\d+)\.", rest)
        if t:
            layers.setdefault(i, set()).add(int(t.group(1)))
    if not down or sorted(down) != list(range(len(down))) or set(channels) != set(down):
        raise WeightLoadError("cannot infer the motion adapter's layout: down-block motion modules are missing "
                              "or incomplete")
    n = len(down)
    mid_layers = {int(m.group(1)) for k in shapes for m in [re.match(r"mid_block\.motion_modules\.0\."
                                                                     r"transformer_blocks\.(\d+)\.", k)] if m}
    return {
        "block_out_channels": [channels[i] for i in range(n)],
        "motion_layers_per_block": [len(down[i]) for i in range(n)],
        "motion_transformer_layers_per_block": [len(layers.get(i, {0})) for i in range(n)],
        "motion_num_attention_heads": 8,  # not stored in checkpoints; every SD 1.5 motion module uses 8
        "motion_max_seq_length": int(max_seq_length),
        "use_motion_mid_block": bool(mid_layers),
        "motion_transformer_layers_per_mid_block": max(len(mid_layers), 1),
    }
