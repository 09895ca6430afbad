"""The converted-folder format, owned here: manifest, file names, version, layout contract.

A converted folder is a diffusers folder's support files (model index, scheduler config, tokenizers,
each component's ``config.json``) plus, per component, ``<component>/weights.safetensors`` in MLX
layout under our parameter names, and ``mlx_manifest.json`` describing it. Format version 1 (the
first) is what this version writes and reads; a manifest without a ``components`` list is a version-1
folder of the three Stable Diffusion components.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from .config import read_json
from .errors import ModelSourceError

FORMAT = "mlx-stablefused"
FORMAT_VERSION = 1
MANIFEST_NAME = "mlx_manifest.json"
WEIGHTS_NAME = "weights.safetensors"
LAYOUT = "mlx"  # the tensor layout of converted weights (see LAYOUT_CONTRACT)
LAYOUT_CONTRACT = "NHWC convolutions (O, kh, kw, I); 1x1 convolutions as Linear (O, I)"
HUB_PATTERNS = (MANIFEST_NAME, f"*/{WEIGHTS_NAME}")


def weights_path(root: Path, component: str) -> Path:
    return Path(root) / component / WEIGHTS_NAME


def is_converted(root: Path) -> bool:
    return (Path(root) / MANIFEST_NAME).is_file()


def manifest(*, source: str, dtype: str, components: Iterable[str], converter_version: str,
             **extra: Any) -> dict[str, Any]:
    """The manifest of a converted folder (``extra``: e.g. ``source_files``, ``demo_version``)."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "converter_version": converter_version,
            "source": source, "dtype": dtype, "components": list(components), "layout": LAYOUT_CONTRACT, **extra}


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest of ``root``, refused unless it is one this version reads."""
    path = Path(root) / MANIFEST_NAME
    data = read_json(path)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ModelSourceError(f"{path} is not an {FORMAT} manifest")
    if data.get("format_version") != FORMAT_VERSION:
        raise ModelSourceError(f"{root} was converted with format version {data.get('format_version')}; "
                               f"this version reads {FORMAT_VERSION}. Convert the model again.")
    return data


def check_components(root: Path, data: dict[str, Any], wanted: Iterable[str]) -> None:
    """Raise unless the converted folder holds every ``wanted`` component (version-1 folders list none)."""
    listed = data.get("components")
    missing = [c for c in wanted if (listed is not None and c not in listed) or not weights_path(root, c).is_file()]
    if missing:
        raise ModelSourceError(f"converted folder {root} lacks {missing} (no {WEIGHTS_NAME}); convert the model again")
