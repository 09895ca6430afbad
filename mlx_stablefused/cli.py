"""The ``mlx-stablefused`` command: text-to-image and model conversion."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from .demo import DEMO_MODEL_ID, DEMO_NOTICE
from .errors import ModelSourceError, UnsupportedModelError, WeightLoadError

EXPECTED_ERRORS = (ModelSourceError, UnsupportedModelError, WeightLoadError, ValueError, TypeError,
                   FileExistsError)


DEFAULT_HUB_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help=f"hub repo id, diffusers folder or converted folder (default: {DEFAULT_HUB_MODEL}; "
                        f"offline, the built-in demo model {DEMO_MODEL_ID}, which makes noise)")
    p.add_argument("--backend", default="mlx", help="compute backend (default: mlx)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--variant", default=None, help="weight variant to download, e.g. fp16")


def _add_generation_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: 30; 20 for the demo model)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--guidance-rescale", type=float, default=0.0)
    p.add_argument("--scheduler", default=None, help="sampler name (default: the model's own)")
    p.add_argument("--height", type=int, default=None, help="default: 512 (256 for the demo model)")
    p.add_argument("--width", type=int, default=None, help="default: 512 (256 for the demo model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--output", default="output.png", help="image path; several images get -0, -1 ... suffixes")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlx-stablefused", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    t2i = sub.add_parser("txt2img", help="generate images from a prompt")
    _add_model_flags(t2i)
    _add_generation_flags(t2i)
    conv = sub.add_parser("convert", help="convert a diffusers model to an MLX folder")
    conv.add_argument("source", help="hub repo id or diffusers folder")
    conv.add_argument("destination", help="folder to create")
    conv.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    conv.add_argument("--variant", default=None, help="weight variant to read, e.g. fp16")
    conv.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    return parser


def output_paths(output: str, n: int) -> list[Path]:
    path = Path(output)
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(n)]


def save_image_atomically(image, path: Path) -> None:
    from .checkpoint_io import atomic_path

    fmt = (path.suffix.lstrip(".") or "png").upper()
    fmt = {"JPG": "JPEG"}.get(fmt, fmt)
    with atomic_path(path, suffix=path.suffix) as tmp:
        image.save(tmp, format=fmt)


def default_model(variant: str | None) -> str:
    """The hub's SD 1.5 when reachable (or cached); otherwise the offline demo model, said out loud."""
    from .sources import resolve_model

    try:
        return str(resolve_model(DEFAULT_HUB_MODEL, variant=variant).root)
    except ModelSourceError as e:
        print(f"[mlx-stablefused] {DEFAULT_HUB_MODEL} is unavailable ({str(e).split('.')[0]}).", file=sys.stderr)
        return DEMO_MODEL_ID


def run_txt2img(args: argparse.Namespace) -> int:
    from .pipelines.text_to_image import TextToImageDiffusion

    if args.model is None:
        args.model = default_model(args.variant)
    demo = args.model == DEMO_MODEL_ID
    if demo:
        print(DEMO_NOTICE, file=sys.stderr)
    size = 256 if demo else 512
    args.height, args.width = args.height or size, args.width or size
    args.steps = args.steps or (20 if demo else 30)
    pipe = TextToImageDiffusion(model_id=args.model, backend=args.backend, dtype=args.dtype, variant=args.variant,
                                scheduler=args.scheduler, progress=not args.no_progress)
    start = time.perf_counter()
    images = pipe(prompt=args.prompt, negative_prompt=args.negative_prompt, image_height=args.height,
                  image_width=args.width, num_inference_steps=args.steps, guidance_scale=args.guidance,
                  guidance_rescale=args.guidance_rescale, seed=args.seed, num_images_per_prompt=args.num_images)
    elapsed = time.perf_counter() - start
    for image, path in zip(images, output_paths(args.output, len(images))):
        save_image_atomically(image, path)
        print(f"wrote {path}")
    print(f"{len(images)} image(s), {args.steps} steps, {elapsed:.1f} s ({type(pipe.scheduler).__name__})",
          file=sys.stderr)
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from .backends.mlx.loading import convert_model
    from .sources import resolve_model

    source = resolve_model(args.source, variant=args.variant)
    out = convert_model(source, args.destination, dtype=args.dtype, variant=args.variant, overwrite=args.overwrite)
    print(f"converted {args.source} -> {out} ({args.dtype})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"txt2img": run_txt2img, "convert": run_convert}
    try:
        return handlers[args.command](args)
    except EXPECTED_ERRORS as e:
        print(f"mlx-stablefused: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mlx-stablefused: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
