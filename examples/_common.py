"""Shared command-line set-up for the example scripts (each mirrors one stablefused notebook).

Flags are validated as the CLI validates them (one line naming the flag, exit 2). Sizes, steps and frame
counts left unset get the notebook's values on a real model, and small ones on the offline demo model
(whose images are noise anyway), said in one line: the examples then finish in seconds, not an hour.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from mlx_stablefused.cli import default_model
from mlx_stablefused.cli_values import positive
from mlx_stablefused.demo import DEMO_MODEL_ID, DEMO_NOTICE, DEMO_SIZE, DEMO_STEPS

# flag -> (value on a real model, value on the demo model); examples add their own with ``defaults``.
COMMON_DEFAULTS = {"size": (512, DEMO_SIZE), "steps": (30, DEMO_STEPS)}


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="hub id or folder (default: SD 1.5; offline: the noise-making demo)")
    p.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--scheduler", default=None, help="a sampler name (default: the model's own)")
    p.add_argument("--steps", type=positive("--steps"), default=None,
                   help=f"sampling steps (default: 30; {DEMO_STEPS} on the demo model)")
    p.add_argument("--size", type=positive("--size"), default=None,
                   help=f"image height and width, a multiple of 8 (default: 512; {DEMO_SIZE} on the demo model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fps", type=positive("--fps"), default=8)
    p.add_argument("--output-dir", default="outputs")
    p.set_defaults(example_defaults=dict(COMMON_DEFAULTS))
    return p


def defaults(p: argparse.ArgumentParser, **flags: tuple[Any, Any]) -> None:
    """Register ``flag=(real-model value, demo value)`` for flags added with ``default=None``."""
    p.get_default("example_defaults").update(flags)


def setup(args: argparse.Namespace, cls: Any):
    """The pipeline and output folder for ``args``; fills unset sizes/steps/frames for the model in use."""
    model = args.model or default_model(None)
    demo = model == DEMO_MODEL_ID
    chosen = {}
    for flag, (real, small) in args.example_defaults.items():
        if getattr(args, flag) is None:
            setattr(args, flag, small if demo else real)
            chosen[flag] = getattr(args, flag)
    if args.size % 8:
        sys.exit(f"{sys.argv[0]}: error: --size: must be a multiple of 8, got {args.size}")
    if demo:
        print(DEMO_NOTICE, file=sys.stderr)
        if chosen:
            said = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in chosen.items())
            print(f"[mlx-stablefused] demo model: small defaults ({said}); pass the flags to change them",
                  file=sys.stderr)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe = cls(model_id=model, dtype=args.dtype, scheduler=args.scheduler)
    return pipe, out


def saved(path: Path) -> Path:
    print(f"wrote {path}")
    return path
