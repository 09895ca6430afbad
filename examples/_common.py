"""Shared command-line set-up for the example scripts (each mirrors one stablefused notebook)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mlx_stablefused.cli import default_model
from mlx_stablefused.demo import DEMO_MODEL_ID, DEMO_NOTICE


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default=None, help="hub id or folder (default: SD 1.5; offline: the noise-making demo)")
    p.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--scheduler", default=None)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--size", type=int, default=512, help="image height and width")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--output-dir", default="outputs")
    return p


def setup(args: argparse.Namespace, cls: type):
    """The pipeline and output folder for ``args``; says so when the offline demo model is used."""
    model = args.model or default_model(None)
    if model == DEMO_MODEL_ID:
        print(DEMO_NOTICE, file=sys.stderr)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe = cls(model_id=model, dtype=args.dtype, scheduler=args.scheduler)
    return pipe, out


def saved(path: Path) -> Path:
    print(f"wrote {path}")
    return path
