"""The ``mlx-stablefused`` command: generate, edit, walk, interpolate, convert."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from .demo import DEMO_MODEL_ID, DEMO_MOTION_ADAPTER_ID, DEMO_NOTICE, resolve_special_id
from .errors import ModelSourceError, UnsupportedModelError, WeightLoadError

EXPECTED_ERRORS = (ModelSourceError, UnsupportedModelError, WeightLoadError, ValueError, TypeError,
                   FileExistsError, FileNotFoundError)
DEFAULT_HUB_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_MOTION_ADAPTER = "guoyww/animatediff-motion-adapter-v1-5-2"
DTYPES = ["float32", "float16", "bfloat16"]


# ------------------------------------------------------------------------------------------- flags
def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help=f"hub repo id, diffusers folder or converted folder (default: {DEFAULT_HUB_MODEL}; "
                        f"offline, the built-in demo model {DEMO_MODEL_ID}, which makes noise)")
    p.add_argument("--backend", default="mlx", choices=["mlx", "torch"], help="compute backend (default: mlx)")
    p.add_argument("--device", default=None, help="torch: cuda, mps or cpu (default: the best available); "
                                                  "mlx: gpu or cpu")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--variant", default=None, help="weight variant to download, e.g. fp16")
    p.add_argument("--scheduler", default=None, help="sampler name (default: the model's own)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _sampling_flags(p: argparse.ArgumentParser, prompt_nargs: str | None = None) -> None:
    p.add_argument("--prompt", required=True, nargs=prompt_nargs)
    p.add_argument("--negative-prompt", default=None, nargs=prompt_nargs)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: 30; 20 for the demo model)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--guidance-rescale", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)


def _size_flags(p: argparse.ArgumentParser, resize_only: bool = False) -> None:
    what = "resize the input to this" if resize_only else "default: 512 (256 for the demo model)"
    p.add_argument("--height", type=int, default=None, help=what)
    p.add_argument("--width", type=int, default=None, help=what)


def _start_flags(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--strength", type=float, default=None, help="fraction of the schedule that runs (diffusers)")
    group.add_argument("--start-step", type=int, default=None, help="steps skipped (stablefused)")


def _output_flag(p: argparse.ArgumentParser, default: str, video: bool = False) -> None:
    hint = "gif, mp4, webm, mkv, mov or avi" if video else "image path; several images get -0, -1 ... suffixes"
    p.add_argument("--output", default=default, help=hint)
    if video:
        p.add_argument("--fps", type=int, default=8)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlx-stablefused", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("txt2img", help="generate images from a prompt")
    _model_flags(p)
    _sampling_flags(p)
    _size_flags(p)
    _output_flag(p, "output.png")
    p.add_argument("--num-images", type=int, default=1)

    p = sub.add_parser("img2img", help="re-imagine an image following a prompt")
    _model_flags(p)
    _sampling_flags(p)
    _size_flags(p, resize_only=True)
    _start_flags(p)
    _output_flag(p, "img2img.png")
    p.add_argument("--image", required=True)
    p.add_argument("--num-images", type=int, default=1)

    p = sub.add_parser("inpaint", help="repaint the white part of a mask")
    _model_flags(p)
    _sampling_flags(p)
    _size_flags(p, resize_only=True)
    _start_flags(p)
    _output_flag(p, "inpaint.png")
    p.add_argument("--image", required=True)
    p.add_argument("--mask", required=True, help="white = repaint, black = keep")
    p.add_argument("--mode", default="auto", choices=["auto", "unet", "blend"])
    p.add_argument("--num-images", type=int, default=1)

    p = sub.add_parser("walk", help="outpainting animation: pan or zoom out, painting what comes into view")
    _model_flags(p)
    _sampling_flags(p, prompt_nargs="+")
    _size_flags(p)
    _start_flags(p)
    _output_flag(p, "walk.mp4", video=True)
    p.add_argument("--image", required=True)
    p.add_argument("--walk-type", nargs="+", default=["backward"],
                   help="up, down, left, right, backward (zoom out) or forward (zoom in); one or one per step")
    p.add_argument("--num-inpainting-steps", type=int, default=4)
    p.add_argument("--interpolation-steps", type=int, default=30, help="frames per inpainting step")
    p.add_argument("--translation", type=int, default=64, help="pixels per step (pans) or border (zoom)")
    p.add_argument("--mode", default="auto", choices=["auto", "unet", "blend"])

    p = sub.add_parser("interpolate", help="a video walking from prompt to prompt")
    _model_flags(p)
    _sampling_flags(p, prompt_nargs="+")
    _size_flags(p)
    _output_flag(p, "interpolation.mp4", video=True)
    p.add_argument("--interpolation-steps", type=int, nargs="+", default=[8], help="frames per pair (one, or per pair)")
    p.add_argument("--batch-size", type=int, default=4, help="frames denoised together")

    p = sub.add_parser("video", help="text-to-video with an AnimateDiff motion adapter")
    _model_flags(p)
    _sampling_flags(p)
    _size_flags(p)
    _output_flag(p, "video.mp4", video=True)
    p.add_argument("--motion-adapter", default=None,
                   help=f"MotionAdapter folder or hub id, or a .ckpt file (default: {DEFAULT_MOTION_ADAPTER}; "
                        "with the demo model, a random demo adapter)")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--context-length", type=int, default=None, help="sliding windows of this many frames")
    p.add_argument("--context-stride", type=int, default=4)

    p = sub.add_parser("convert", help="convert a diffusers model to an MLX folder")
    p.add_argument("source", help="hub repo id or diffusers folder")
    p.add_argument("destination", help="folder to create")
    p.add_argument("--dtype", default="float16", choices=DTYPES)
    p.add_argument("--variant", default=None, help="weight variant to read, e.g. fp16")
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    return parser


# ------------------------------------------------------------------------------------------ running
def default_model(variant: str | None) -> str:
    """The hub's SD 1.5 when reachable (or cached); otherwise the offline demo model, said out loud."""
    from .sources import resolve_model

    try:
        return str(resolve_model(DEFAULT_HUB_MODEL, variant=variant).root)
    except ModelSourceError as e:
        print(f"[mlx-stablefused] {DEFAULT_HUB_MODEL} is unavailable ({str(e).split('.')[0]}).", file=sys.stderr)
        return DEMO_MODEL_ID


def load_pipeline(cls: type, args: argparse.Namespace, size_defaults: bool = True) -> Any:
    """Build ``cls`` from the model flags; fill size and step defaults (smaller for the demo model)."""
    if args.model is None:
        args.model = default_model(args.variant)
    demo = args.model == DEMO_MODEL_ID
    if demo:
        print(DEMO_NOTICE, file=sys.stderr)
    if size_defaults:
        size = 256 if demo else 512
        args.height, args.width = args.height or size, args.width or size
    args.steps = args.steps or (20 if demo else 30)
    return cls(model_id=args.model, backend=args.backend, dtype=args.dtype, variant=args.variant,
               device=args.device, scheduler=args.scheduler, progress=not args.no_progress)


def output_paths(output: str, n: int) -> list[Path]:
    path = Path(output)
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(n)]


def save_image_atomically(image: Any, path: Path) -> None:
    from .checkpoint_io import atomic_path

    fmt = (path.suffix.lstrip(".") or "png").upper()
    fmt = {"JPG": "JPEG"}.get(fmt, fmt)
    with atomic_path(path, suffix=path.suffix) as tmp:
        image.save(tmp, format=fmt)


def save_images(images: list, output: str) -> None:
    for image, path in zip(images, output_paths(output, len(images))):
        save_image_atomically(image, path)
        print(f"wrote {path}")


def save_frames(frames: list, output: str, fps: int) -> None:
    from .utils.images import pil_to_gif, pil_to_video

    path = Path(output)
    (pil_to_gif if path.suffix.lower() == ".gif" else pil_to_video)(frames, path, fps=fps)
    print(f"wrote {path} ({len(frames)} frames at {fps} fps)")


def _common(args: argparse.Namespace) -> dict:
    return dict(num_inference_steps=args.steps, guidance_scale=args.guidance, guidance_rescale=args.guidance_rescale,
                negative_prompt=args.negative_prompt, seed=args.seed)


def run_txt2img(args: argparse.Namespace) -> int:
    from .pipelines.text_to_image import TextToImageDiffusion

    pipe = load_pipeline(TextToImageDiffusion, args)
    images = pipe(prompt=args.prompt, image_height=args.height, image_width=args.width,
                  num_images_per_prompt=args.num_images, **_common(args))
    save_images(images, args.output)
    return 0


def run_img2img(args: argparse.Namespace) -> int:
    from .pipelines.image_to_image import ImageToImageDiffusion

    pipe = load_pipeline(ImageToImageDiffusion, args, size_defaults=False)
    images = pipe(image=args.image, prompt=args.prompt, strength=args.strength, start_step=args.start_step,
                  image_height=args.height, image_width=args.width, num_images_per_prompt=args.num_images,
                  **_common(args))
    save_images(images, args.output)
    return 0


def run_inpaint(args: argparse.Namespace) -> int:
    from .pipelines.inpaint import InpaintDiffusion

    pipe = load_pipeline(InpaintDiffusion, args, size_defaults=False)
    images = pipe(prompt=args.prompt, image=args.image, mask=args.mask, strength=args.strength,
                  start_step=args.start_step, image_height=args.height, image_width=args.width, mode=args.mode,
                  num_images_per_prompt=args.num_images, **_common(args))
    save_images(images, args.output)
    return 0


def _one_or_list(values: list) -> Any:
    return values[0] if values and len(values) == 1 else values


def run_walk(args: argparse.Namespace) -> int:
    from .pipelines.inpaint import InpaintDiffusion

    pipe = load_pipeline(InpaintDiffusion, args)
    common = _common(args)
    common["negative_prompt"] = None if args.negative_prompt is None else _one_or_list(args.negative_prompt)
    frames = pipe.walk(prompt=_one_or_list(args.prompt), image=args.image, walk_type=_one_or_list(args.walk_type),
                       image_height=args.height, image_width=args.width,
                       height_translation_per_step=args.translation, width_translation_per_step=args.translation,
                       num_inpainting_steps=args.num_inpainting_steps, interpolation_steps=args.interpolation_steps,
                       start_step=args.start_step, strength=args.strength, mode=args.mode, **common)
    save_frames(frames, args.output, args.fps)
    return 0


def run_interpolate(args: argparse.Namespace) -> int:
    from .pipelines.latent_walk import LatentWalkDiffusion

    pipe = load_pipeline(LatentWalkDiffusion, args)
    common = _common(args)
    common["negative_prompt"] = None if args.negative_prompt is None else _one_or_list(args.negative_prompt)
    frames = pipe.interpolate(prompt=args.prompt, image_height=args.height, image_width=args.width,
                              interpolation_steps=_one_or_list(args.interpolation_steps), batch_size=args.batch_size,
                              **common)
    save_frames(frames, args.output, args.fps)
    return 0


def _is_unet3d_model(model: str, variant: str | None) -> bool:
    """ModelScope / Zeroscope models carry their own temporal layers and take no motion adapter."""
    from .config import read_json
    from .model_description import STABLE_DIFFUSION, UNET_3D
    from .sources import resolve_model

    unet = STABLE_DIFFUSION.component("unet")
    config = resolve_model(resolve_special_id(model), variant=variant).root / unet.folder / "config.json"
    return config.is_file() and unet.kind_for(read_json(config)) == UNET_3D


def run_video(args: argparse.Namespace) -> int:
    from functools import partial

    from .pipelines.text_to_video import TextToVideoDiffusion

    if args.model is None:
        args.model = default_model(args.variant)
    adapter = args.motion_adapter
    if adapter is None and not _is_unet3d_model(args.model, args.variant):
        adapter = DEMO_MOTION_ADAPTER_ID if args.model == DEMO_MODEL_ID else DEFAULT_MOTION_ADAPTER
    pipe = load_pipeline(partial(TextToVideoDiffusion, motion_adapter=adapter), args)
    if args.context_length:
        pipe.enable_context_windows(args.context_length, args.context_stride)
    videos = pipe(prompt=args.prompt, video_height=args.height, video_width=args.width, video_frames=args.frames,
                  **_common(args))
    save_frames(videos[0], args.output, args.fps)
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from .backends.mlx.loading import convert_model
    from .sources import resolve_model

    source = resolve_model(resolve_special_id(args.source), variant=args.variant)
    out = convert_model(source, args.destination, dtype=args.dtype, variant=args.variant, overwrite=args.overwrite)
    print(f"converted {args.source} -> {out} ({args.dtype})")
    return 0


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "txt2img": run_txt2img, "img2img": run_img2img, "inpaint": run_inpaint, "walk": run_walk,
    "interpolate": run_interpolate, "video": run_video, "convert": run_convert,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        code = HANDLERS[args.command](args)
    except EXPECTED_ERRORS as e:
        print(f"mlx-stablefused: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mlx-stablefused: interrupted", file=sys.stderr)
        return 130
    if args.command != "convert":
        print(f"done in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
