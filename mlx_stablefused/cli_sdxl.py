"""The command line's SDXL flags: the second prompts, micro-conditioning and aesthetic scores, named as
diffusers names the keywords (``--original-size H W`` is ``original_size=(H, W)``). Every generating image
subcommand takes them; a model that is not SDXL refuses them by name, as the API does."""

from __future__ import annotations

import argparse
from typing import Any

from .cli_values import finite, non_negative, positive

# flag suffix -> (keyword, value type maker, metavar); sizes are (height, width), crops (top, left).
PAIRS = {
    "original-size": (positive, ("H", "W")), "target-size": (positive, ("H", "W")),
    "crops-coords-top-left": (non_negative, ("TOP", "LEFT")),
}


def add_sdxl_flags(p: argparse.ArgumentParser, image: bool) -> None:
    """``image``: the image-to-image and inpainting subcommands (refiners), which also take aesthetic scores."""
    group = p.add_argument_group("SDXL models")
    group.add_argument("--prompt-2", default=None, help="prompt for the second text encoder (default: --prompt)")
    group.add_argument("--negative-prompt-2", default=None,
                       help="negative prompt for the second text encoder (default: --negative-prompt)")
    for negative in ("", "negative-"):
        for name, (kind, metavar) in PAIRS.items():
            flag = f"--{negative}{name}"
            what = "crop offset in pixels" if name.startswith("crops") else "size in pixels"
            group.add_argument(flag, type=kind(flag), nargs=2, default=None, metavar=metavar,
                               help=f"micro-conditioning {what}{' of the negative branch' if negative else ''} "
                                    f"(default: {'0 0' if name.startswith('crops') else 'the image size'})")
    if image:
        for flag, default in (("--aesthetic-score", 6.0), ("--negative-aesthetic-score", 2.5)):
            group.add_argument(flag, type=finite(flag), default=None, metavar="SCORE",
                               help=f"refiners: aesthetic-score conditioning (default: {default})")


def sdxl_keywords(args: argparse.Namespace) -> dict[str, Any]:
    """The SDXL keywords the user gave (absent ones are left to the pipeline's defaults)."""
    names = ["prompt_2", "negative_prompt_2", "aesthetic_score", "negative_aesthetic_score"]
    names += [f"{negative}{name.replace('-', '_')}" for negative in ("", "negative_") for name in PAIRS]
    out = {}
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            out[name] = tuple(value) if isinstance(value, list) else value
    return out
