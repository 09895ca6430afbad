"""What stablefused 0.2.0's constructors took that this port spells differently: ``torch_dtype=``, a
diffusers scheduler object as ``scheduler=``, and the five components passed as diffusers /
transformers objects instead of a ``model_id``. Each is turned into this port's own terms here, before
any loading, so the pipelines stay written once."""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..schedulers import DIFFUSERS_CLASS_NAMES, SCHEDULERS
from ..schedulers.base import COMMON_DEFAULTS

COMPONENT_NAMES = ("tokenizer", "text_encoder", "vae", "unet", "scheduler")


def resolve_dtype(dtype: str, torch_dtype: Any) -> str:
    """``torch_dtype`` (stablefused's name: a torch dtype or its name) as this port's ``dtype`` string."""
    if torch_dtype is None:
        return dtype
    name = str(torch_dtype).rsplit(".", 1)[-1]
    if name not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"torch_dtype={torch_dtype!r}: expected float32, float16 or bfloat16")
    if dtype not in ("float32", name):
        raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; pass one of them")
    return name


def scheduler_choice(scheduler: Any) -> tuple[str | None, dict[str, Any]]:
    """``scheduler=``: a sampler name (or ``Scheduler`` member), or a diffusers scheduler object as
    stablefused took, which becomes our sampler of that class with its configuration."""
    if scheduler is None or isinstance(scheduler, str):
        return scheduler, {}
    class_name = type(scheduler).__name__
    if class_name not in DIFFUSERS_CLASS_NAMES or not hasattr(scheduler, "config"):
        raise TypeError(f"scheduler must be a sampler name or a diffusers scheduler of one of "
                        f"{sorted(DIFFUSERS_CLASS_NAMES)}, got {class_name}")
    name = DIFFUSERS_CLASS_NAMES[class_name]
    cls = SCHEDULERS[name][0]
    allowed = {**COMMON_DEFAULTS, **cls.defaults}
    return name, {k: v for k, v in dict(scheduler.config).items() if k in allowed}


def folder_from_components(**given: Any) -> Path:
    """stablefused's ``XDiffusion(tokenizer=, text_encoder=, vae=, unet=, scheduler=)``: the diffusers /
    transformers objects written as a diffusers folder (safetensors), which this port's loaders then read
    into its own networks. The folder lives until the process exits (the loaders may re-read it)."""
    missing = [name for name in COMPONENT_NAMES if given.get(name) is None]
    if missing:
        raise ValueError("Either (`model_id`) or (`tokenizer`, `text_encoder`, `vae`, `unet`, `scheduler`) must be "
                         f"provided; missing: {', '.join(missing)}")
    for name in COMPONENT_NAMES:
        saver = "save_pretrained" if name != "scheduler" else "save_config"
        if not callable(getattr(given[name], saver, None)):
            raise TypeError(f"{name} must be a diffusers / transformers object (it needs {saver}), "
                            f"got {type(given[name]).__name__}")
    root = Path(tempfile.mkdtemp(prefix="mlx-stablefused-components-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    video = type(given["unet"]).__name__ == "UNet3DConditionModel"
    index = {"_class_name": "TextToVideoSDPipeline" if video else "StableDiffusionPipeline"}
    for name in COMPONENT_NAMES:
        obj = given[name]
        if name == "scheduler":
            obj.save_config(str(root / name))
        elif name == "tokenizer":
            obj.save_pretrained(str(root / name))
        else:
            obj.save_pretrained(str(root / name), safe_serialization=True)
        library = "transformers" if name in ("tokenizer", "text_encoder") else "diffusers"
        index[name] = [library, type(obj).__name__]
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return root
