"""The mlx-stablefused command: generate, edit, walk, interpolate, convert, serve."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

from . import __version__
from .cli_controlnet import add_controlnet_flags, check_controlnet_flags, controlnet_keywords, controlnet_source
from .cli_ip_adapter import add_ip_adapter_flags, check_ip_adapter_flags, ip_adapter_keywords, load_flagged_ip_adapter
from .cli_sdxl import add_sdxl_flags, sdxl_keywords
from .cli_values import (IMAGE_FORMATS, IMAGE_SUFFIXES, VIDEO_SUFFIXES, InvalidValue, check_backend,
                         check_input_image, check_output, finite, fraction, non_negative, one_line, one_of,
                         output_paths, positive)
from .demo import DEMO_MODEL_ID, DEMO_MOTION_ADAPTER_ID, DEMO_NOTICE, DEMO_SIZE, DEMO_STEPS, resolve_special_id
from .distributed import is_writer
from .errors import DistributedError, ModelSourceError, NonFiniteError, UnsupportedModelError, WeightLoadError
from .pipelines.walk_geometry import WalkType
from .schedulers import SCHEDULER_NAMES

# Failures of the input or the machine (files, permissions, disk): one line, exit 1. Anything else is a bug
# and keeps its traceback.
EXPECTED_ERRORS = (ModelSourceError, UnsupportedModelError, WeightLoadError, NonFiniteError, DistributedError, ValueError,
                   TypeError, NotImplementedError, OSError, MemoryError)
DEFAULT_HUB_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_MOTION_ADAPTER = "guoyww/animatediff-motion-adapter-v1-5-2"
DTYPES = ["float32", "float16", "bfloat16"]
MODES = ["auto", "unet", "blend"]
WALK_TYPES = tuple(w.value for w in WalkType)
VIDEO_COMMANDS = ("walk", "interpolate", "video")


class BadValue(Exception):
    """A flag's value was refused while parsing; ``main`` reports it like any other bad value."""


class Parser(argparse.ArgumentParser):
    """argparse, except that a value refused by a ``type=`` check is a bad value (exit 1), not a usage error."""

    def error(self, message: str) -> NoReturn:
        context = sys.exc_info()[1]
        if isinstance(context, argparse.ArgumentError) and isinstance(context.__context__, InvalidValue):
            raise BadValue(str(context.__context__)) from None
        super().error(message)


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.option_strings and not any(action.default is v for v in (None, False, argparse.SUPPRESS))
        if shown and "default" not in text:
            text += " (default: %(default)s)"
        return text


# ------------------------------------------------------------------------------------------- flags
def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help=f"hub repo id, diffusers folder, converted folder, or a single-file checkpoint (.safetensors, "
                        f".ckpt; local or owner/repo/file.safetensors) (default: {DEFAULT_HUB_MODEL}; "
                        f"offline, the built-in demo model {DEMO_MODEL_ID}, which makes noise)")
    _vae_flags(p)
    p.add_argument("--backend", default="auto", choices=["auto", "mlx", "torch"],
                   help="compute backend (auto: MLX on Apple Silicon, torch on CUDA and on CPU-only machines "
                        "when installed; MLX_STABLEFUSED_BACKEND overrides auto)")
    p.add_argument("--device", default=None, help="torch: cuda, mps or cpu; mlx: gpu or cpu "
                                                  "(default: the best available)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="weight and compute precision")
    p.add_argument("--variant", default=None, help="weight variant to download, e.g. fp16 (default: none)")
    p.add_argument("--scheduler", default=None, metavar="NAME",
                   type=one_of("--scheduler", SCHEDULER_NAMES, "scheduler"),
                   help=f"sampler: {', '.join(SCHEDULER_NAMES)} (default: the model's own)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--vae-tiling", action="store_true", help="decode (and encode) on overlapping VAE tiles: "
                                                             "memory of one tile at any size")
    p.add_argument("--vae-slicing", action="store_true", help="decode one image (or frame batch) at a time")
    p.add_argument("--attention-slicing", action="store_true", help="attend in slices of 1024 queries")
    p.add_argument("--low-memory", action="store_true",
                   help="the low-memory preset: text encoders and UNet freed when not in use, attention and VAE "
                        "slicing, the guidance halves one after the other; exact (see the README's memory section)")
    p.add_argument("--low-memory-8bit-unet", action="store_true",
                   help="with --low-memory: also quantize the UNet's Linear layers to 8 bits (MLX backend only)")


def _vae_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vae", default=None, metavar="VAE",
                   help="a separate VAE: a .safetensors/.ckpt file or a diffusers VAE folder (default: the model's own)")
    p.add_argument("--prediction-type", default=None, choices=["epsilon", "v_prediction"],
                   help="what the UNet predicts; SD 2.x 768-v single files without a .yaml need v_prediction "
                        "(default: the model's own)")


def _sampling_flags(p: argparse.ArgumentParser, prompt_nargs: str | None = None) -> None:
    several = " (one, or one per prompt)" if prompt_nargs else ""
    p.add_argument("--prompt", required=True, nargs=prompt_nargs, help="what to paint" + several)
    p.add_argument("--negative-prompt", default=None, nargs=prompt_nargs,
                   help="what to steer away from" + several + " (default: none)")
    p.add_argument("--steps", type=positive("--steps"), default=None, metavar="N",
                   help=f"sampling steps, a positive integer (default: 30; {DEMO_STEPS} for the demo model)")
    p.add_argument("--guidance", type=finite("--guidance"), default=7.5, metavar="SCALE",
                   help="classifier-free guidance scale, a finite number; 1 or less turns it off")
    p.add_argument("--guidance-rescale", type=finite("--guidance-rescale"), default=0.0, metavar="PHI",
                   help="rescale of the guided prediction, a finite number, usually in [0, 1]")
    p.add_argument("--seed", type=non_negative("--seed"), default=0, metavar="N",
                   help="random seed, a non-negative integer; the same seed gives the same file")
    _prompt_syntax_flags(p)


def _prompt_syntax_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plain-prompts", action="store_true",
                   help="read prompts as plain text, cut at 77 tokens (default: AUTOMATIC1111's syntax: "
                        "(word:1.3), (word), [word], BREAK, prompts of any length, <lora:name:weight> tags)")
    p.add_argument("--lora-dir", default=None, metavar="FOLDER",
                   help="folder of the LoRA files that <lora:name:weight> tags name (default: none)")
    p.add_argument("--textual-inversion", action="append", default=None, metavar="PATH",
                   help="a textual-inversion embedding (.safetensors, .pt, .bin, or a diffusers folder or hub id), "
                        "used by its own token; repeat for several (default: none)")


def _size_flags(p: argparse.ArgumentParser, resize_only: bool = False) -> None:
    what = ("default: the input's size" if resize_only
            else f"default: 512, for SDXL models the UNet's (1024); {DEMO_SIZE} for the demo model")
    for flag in ("--height", "--width"):
        p.add_argument(flag, type=positive(flag), default=None, metavar="PIXELS",
                       help=f"{flag[2:]} in pixels, a positive multiple of 8 ({what})")


def _start_flags(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--strength", type=fraction("--strength"), default=None, metavar="FRACTION",
                       help="fraction of the schedule that runs, in [0, 1] (diffusers; default: all of it)")
    group.add_argument("--start-step", type=non_negative("--start-step"), default=None, metavar="N",
                       help="steps skipped, an integer in [0, steps - 1] (stablefused; default: 0)")


def _output_flag(p: argparse.ArgumentParser, default: str, video: bool = False) -> None:
    hint = (f"video file: {', '.join(VIDEO_SUFFIXES)}" if video
            else f"image file: {', '.join(IMAGE_SUFFIXES)}; several images get -0, -1 ... suffixes")
    p.add_argument("--output", default=default, metavar="PATH", help=hint)
    if video:
        p.add_argument("--fps", type=positive("--fps"), default=8, metavar="N",
                       help="frames per second, a positive integer")


def _count_flag(p: argparse.ArgumentParser, flag: str, default: int | None, what: str, unset: str = "") -> None:
    note = f" (default: {unset})" if unset else ""
    p.add_argument(flag, type=positive(flag), default=default, metavar="N", help=f"{what}, a positive integer{note}")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="mlx-stablefused", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)

    p = command("txt2img", "generate images from a prompt")
    _model_flags(p)
    _sampling_flags(p)
    _size_flags(p)
    _output_flag(p, "output.png")
    _count_flag(p, "--num-images", 1, "images per prompt")
    add_sdxl_flags(p, image=False)
    add_controlnet_flags(p)
    add_ip_adapter_flags(p)

    p = command("img2img", "re-imagine an image following a prompt")
    _model_flags(p)
    _sampling_flags(p)
    _size_flags(p, resize_only=True)
    _start_flags(p)
    _output_flag(p, "img2img.png")
    p.add_argument("--image", required=True, metavar="PATH", help="the image to start from")
    _count_flag(p, "--num-images", 1, "images per prompt")
    add_sdxl_flags(p, image=True)
    add_controlnet_flags(p)
    add_ip_adapter_flags(p)

    p = command("inpaint", "repaint the white part of a mask")
    _model_flags(p)
    _sampling_flags(p)
    _size_flags(p, resize_only=True)
    _start_flags(p)
    _output_flag(p, "inpaint.png")
    p.add_argument("--image", required=True, metavar="PATH", help="the image to repaint")
    p.add_argument("--mask", required=True, metavar="PATH", help="white = repaint, black = keep")
    p.add_argument("--mode", default="auto", choices=MODES,
                   help="unet: a 9-channel inpainting model; blend: any model, keeping the black part; auto: by model")
    _count_flag(p, "--num-images", 1, "images per prompt")
    add_sdxl_flags(p, image=True)
    add_controlnet_flags(p)
    add_ip_adapter_flags(p)

    p = command("walk", "outpainting animation: pan or zoom out, painting what comes into view")
    _model_flags(p)
    _sampling_flags(p, prompt_nargs="+")
    _size_flags(p)
    _start_flags(p)
    _output_flag(p, "walk.mp4", video=True)
    p.add_argument("--image", required=True, metavar="PATH", help="the first frame")
    p.add_argument("--walk-type", nargs="+", default=["backward"], type=one_of("--walk-type", WALK_TYPES, "walk type"),
                   metavar="TYPE", help="up, down, left, right, backward (zoom out) or forward (zoom in); "
                                        "one, or one per inpainting step (default: backward)")
    _count_flag(p, "--num-inpainting-steps", 4, "images painted")
    _count_flag(p, "--interpolation-steps", 30, "frames per inpainting step")
    _count_flag(p, "--translation", 64, "pixels per step (pans) or border width (zoom)")
    p.add_argument("--mode", default="auto", choices=MODES, help="how the exposed part is painted (see inpaint)")

    p = command("interpolate", "a video walking from prompt to prompt")
    _model_flags(p)
    _sampling_flags(p, prompt_nargs="+")
    _size_flags(p)
    _output_flag(p, "interpolation.mp4", video=True)
    p.add_argument("--interpolation-steps", type=positive("--interpolation-steps"), nargs="+", default=[8],
                   metavar="N", help="frames per pair of prompts, positive integers: one, or one per pair "
                                     "(default: 8)")
    _count_flag(p, "--batch-size", 4, "frames denoised together")

    p = command("video", "text-to-video with an AnimateDiff motion adapter")
    _model_flags(p)
    _sampling_flags(p)
    _size_flags(p)
    _output_flag(p, "video.mp4", video=True)
    p.add_argument("--motion-adapter", default=None, metavar="ADAPTER",
                   help=f"MotionAdapter folder or hub id, or a .ckpt file (default: {DEFAULT_MOTION_ADAPTER}; "
                        f"with the demo model, the random demo adapter {DEMO_MOTION_ADAPTER_ID}, which can also "
                        "be named here)")
    _count_flag(p, "--frames", 16, "frames in the video (at most the adapter's window, 32, without context windows)")
    _count_flag(p, "--context-length", None, "sliding windows of this many frames", unset="off")
    _count_flag(p, "--context-stride", 4, "frames between window starts")
    add_controlnet_flags(p, video=True)
    add_ip_adapter_flags(p)

    p = command("convert", "convert a diffusers model to an MLX folder")
    p.add_argument("source", help="hub repo id, diffusers folder, or a single-file checkpoint (.safetensors, .ckpt)")
    _vae_flags(p)
    p.add_argument("destination", help="folder to create")
    p.add_argument("--dtype", default="float16", choices=DTYPES, help="precision of the stored weights")
    p.add_argument("--variant", default=None, help="weight variant to read, e.g. fp16 (default: none)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination")

    p = command("serve", "serve AUTOMATIC1111- and OpenAI-compatible HTTP APIs (needs the server extra)")
    _serve_flags(p)
    return parser


def _serve_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help=f"as for txt2img (default: {DEFAULT_HUB_MODEL}; offline, the "
                                                  f"demo model {DEMO_MODEL_ID})")
    p.add_argument("--backend", default="auto", choices=["auto", "mlx", "torch"], help="as for txt2img")
    p.add_argument("--device", default=None, help="as for txt2img (default: the best available)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="weight and compute precision")
    p.add_argument("--variant", default=None, help="weight variant to download, e.g. fp16 (default: none)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind: loopback unless told otherwise")
    p.add_argument("--port", type=positive("--port"), default=7860, metavar="N", help="TCP port")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every request (default: none)")
    p.add_argument("--lora-dir", default=None, metavar="FOLDER",
                   help="folder of the LoRA files that <lora:name:weight> tags name (default: none)")
    p.add_argument("--outputs", default=None, metavar="FOLDER",
                   help="also write every result there, with its parameters (default: nothing written)")
    p.add_argument("--motion-adapter", default=None, metavar="ADAPTER",
                   help="MotionAdapter folder, hub id or .ckpt for the web UI's AnimateDiff videos, loaded on first "
                        f"use (default: none; the demo model uses {DEMO_MOTION_ADAPTER_ID})")
    for flag, default, what in (("--max-size", 2048, "largest width or height"), ("--max-steps", 150, "most steps"),
                                ("--max-batch", 8, "most images per request"),
                                ("--max-frames", 64, "most frames per video or cells per sweep grid"),
                                ("--max-queue", 16, "requests waiting; more get 503")):
        p.add_argument(flag, type=positive(flag), default=default, metavar="N", help=what)


# ------------------------------------------------------------------------------------------ running
def default_model(variant: str | None) -> str:
    """The hub's SD 1.5 when reachable (or cached); otherwise the offline demo model, said in one line."""
    from .hub_access import offline_reason
    from .sources import resolve_model

    reason = offline_reason()  # seconds at most, where the hub's own retries take ~23 s
    try:
        return str(resolve_model(DEFAULT_HUB_MODEL, variant=variant, local_files_only=reason is not None).root)
    except ModelSourceError as e:
        why = f"offline: {reason}; not in the local cache" if reason else str(e).split(";")[0]
        print(f"[mlx-stablefused] {DEFAULT_HUB_MODEL} is unavailable ({why}).", file=sys.stderr)
        return DEMO_MODEL_ID


def load_pipeline(cls: type, args: argparse.Namespace, size_defaults: bool = True) -> Any:
    """Build ``cls`` from the model flags; fill size and step defaults (smaller for the demo model)."""
    if args.model is None:
        args.model = default_model(args.variant)
    from .pipelines.sdxl_conditioning import default_image_side

    demo = args.model == DEMO_MODEL_ID
    if args.steps is None:
        args.steps = DEMO_STEPS if demo else 30
    check_start(args)
    if demo:
        print(DEMO_NOTICE, file=sys.stderr)
    if getattr(args, "backend_choice", None) is not None:
        print(args.backend_choice)  # which backend "auto" picked, and why
    model_files = {k: v for k, v in (("vae", args.vae), ("prediction_type", args.prediction_type)) if v is not None}
    model_files.update(controlnet_source(args))
    pipe = cls(model_id=args.model, backend=args.backend, dtype=args.dtype, variant=args.variant,
               device=args.device, scheduler=args.scheduler, progress=not args.no_progress, **model_files)
    if size_defaults:  # only absent sizes get defaults: the parser has refused 0 and negatives
        size = DEMO_SIZE if demo else default_image_side(pipe.backend, pipe.vae_scale_factor)  # 512; SDXL: the UNet's
        args.height = size if args.height is None else args.height
        args.width = size if args.width is None else args.width
    if getattr(args, "vae_tiling", False):
        pipe.enable_tiling()
    if getattr(args, "vae_slicing", False):
        pipe.enable_slicing()
    if getattr(args, "attention_slicing", False):
        pipe.enable_attention_slicing()
    if getattr(args, "low_memory", False) or getattr(args, "low_memory_8bit_unet", False):
        pipe.enable_low_memory(unet_bits=8 if getattr(args, "low_memory_8bit_unet", False) else None)
    for source in args.textual_inversion or []:
        pipe.load_textual_inversion(source)
    if not args.plain_prompts:
        pipe.enable_prompt_weighting(lora_dir=args.lora_dir)
    load_flagged_ip_adapter(pipe, args)
    return pipe


def save_image_atomically(image: Any, path: Path) -> None:
    from .checkpoint_io import atomic_path

    with atomic_path(path, suffix=path.suffix) as tmp:  # check_output has refused any other extension
        image.save(tmp, format=IMAGE_FORMATS[path.suffix.lower()])


def save_images(images: list, output: str) -> None:
    if not is_writer():  # under mlx.launch / torchrun every rank has the result; rank 0 writes it
        return
    for image, path in zip(images, output_paths(output, len(images))):
        save_image_atomically(image, path)
        print(f"wrote {path}")


def save_frames(frames: list, output: str, fps: int) -> None:
    from .utils.images import pil_to_gif, pil_to_video

    if not is_writer():
        return
    path = Path(output)
    (pil_to_gif if path.suffix.lower() == ".gif" else pil_to_video)(frames, path, fps=fps)
    print(f"wrote {path} ({len(frames)} frames at {fps} fps)")


def _common(args: argparse.Namespace) -> dict:
    return dict(num_inference_steps=args.steps, guidance_scale=args.guidance, guidance_rescale=args.guidance_rescale,
                negative_prompt=args.negative_prompt, seed=args.seed)


def run_txt2img(args: argparse.Namespace) -> int:
    from .pipelines.text_to_image import TextToImageDiffusion

    pipe = load_pipeline(TextToImageDiffusion, args, size_defaults=not args.control_image)  # else: the control's size
    images = pipe(prompt=args.prompt, image_height=args.height, image_width=args.width,
                  num_images_per_prompt=args.num_images, **_common(args), **sdxl_keywords(args),
                  **controlnet_keywords(args), **ip_adapter_keywords(args))
    save_images(images, args.output)
    return 0


def run_img2img(args: argparse.Namespace) -> int:
    from .pipelines.image_to_image import ImageToImageDiffusion

    pipe = load_pipeline(ImageToImageDiffusion, args, size_defaults=False)
    images = pipe(image=args.image, prompt=args.prompt, strength=args.strength, start_step=args.start_step,
                  image_height=args.height, image_width=args.width, num_images_per_prompt=args.num_images,
                  **_common(args), **sdxl_keywords(args), **controlnet_keywords(args),
                  **ip_adapter_keywords(args))
    save_images(images, args.output)
    return 0


def run_inpaint(args: argparse.Namespace) -> int:
    from .pipelines.inpaint import InpaintDiffusion

    pipe = load_pipeline(InpaintDiffusion, args, size_defaults=False)
    images = pipe(prompt=args.prompt, image=args.image, mask=args.mask, strength=args.strength,
                  start_step=args.start_step, image_height=args.height, image_width=args.width, mode=args.mode,
                  num_images_per_prompt=args.num_images, **_common(args), **sdxl_keywords(args),
                  **controlnet_keywords(args), **ip_adapter_keywords(args))
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
    from .single_file import resolve_model_or_file

    unet = STABLE_DIFFUSION.component("unet")
    config = resolve_model_or_file(resolve_special_id(model), variant=variant).config_path(unet)
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
                  **_common(args), **controlnet_keywords(args, video=True), **ip_adapter_keywords(args))
    save_frames(videos[0], args.output, args.fps)
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from .backends.mlx.loading import convert_model
    from .model_description import description_for
    from .model_index import read_model_index
    from .single_file import resolve_model_or_file, resolve_vae

    model = resolve_special_id(args.source)
    description = description_for(read_model_index(model))  # SDXL: both text encoders, or the refiner's one
    source = resolve_model_or_file(model, variant=args.variant, prediction_type=args.prediction_type,
                                   description=description)
    if args.prediction_type is not None and source.kind != "single_file":
        raise ValueError("--prediction-type: a diffusers or converted model's scheduler config says it already")
    if args.vae is not None:
        source = resolve_vae(args.vae, source)
    description = description_for(read_model_index(source.root))  # a single file's keys said what it is
    out = convert_model(source, args.destination, dtype=args.dtype, variant=args.variant, overwrite=args.overwrite,
                        description=description)
    print(f"converted {args.source} -> {out} ({args.dtype})")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    try:
        from .server import Limits, ServerSettings, serve
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ModelSourceError(f"serve needs the server extra: pip install \"mlx-stablefused[server]\" ({e})") from None
    if args.port > 65535:
        raise ValueError(f"--port: must be at most 65535, got {args.port}")
    if args.lora_dir is not None and not Path(args.lora_dir).expanduser().is_dir():
        raise ValueError(f"--lora-dir: not a folder ({args.lora_dir})")
    check_backend(args.backend, args.device)
    if args.backend == "auto":
        from .backends.auto import resolve_backend

        choice = resolve_backend(args.backend, args.device)
        print(choice)  # which backend "auto" picked, and why
        args.backend = choice.name
    model = args.model if args.model is not None else default_model(args.variant)
    limits = Limits(max_width=args.max_size, max_height=args.max_size, max_steps=args.max_steps,
                    max_batch=args.max_batch, max_frames=args.max_frames, max_queue=args.max_queue)
    return serve(ServerSettings(model=model, backend=args.backend, dtype=args.dtype, device=args.device,
                                variant=args.variant, host=args.host, port=args.port, api_key=args.api_key,
                                lora_dir=None if args.lora_dir is None else Path(args.lora_dir).expanduser(),
                                motion_adapter=args.motion_adapter,
                                outputs=None if args.outputs is None else Path(args.outputs).expanduser(),
                                limits=limits))


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "txt2img": run_txt2img, "img2img": run_img2img, "inpaint": run_inpaint, "walk": run_walk,
    "interpolate": run_interpolate, "video": run_video, "convert": run_convert, "serve": run_serve,
}


def check_start(args: argparse.Namespace) -> None:
    """--strength / --start-step leave at least one step of --steps (the API's rule), once the steps are known."""
    from .pipelines.inputs import start_index

    strength, start_step = getattr(args, "strength", None), getattr(args, "start_step", None)
    if args.steps is None or (strength is None and start_step is None):
        return
    try:
        start_index(args.steps, start_step, strength, order=1)
    except ValueError as e:
        raise ValueError(f"{'--strength' if strength is not None else '--start-step'}: {e}") from None


def check_before_work(args: argparse.Namespace) -> None:
    """Everything that can be refused without a model: output file, input images, backend, device."""
    if args.command in ("convert", "serve"):
        return
    check_output(args.output, video=args.command in VIDEO_COMMANDS, count=getattr(args, "num_images", 1))
    check_ip_adapter_flags(args)
    for flag in ("--image", "--mask", "--ip-adapter-image"):
        path = getattr(args, flag[2:].replace("-", "_"), None)
        if path is not None:
            check_input_image(path, flag)
    check_start(args)
    check_size_flags(args)
    check_controlnet_flags(args)
    if args.backend == "auto":
        from .backends.auto import resolve_backend

        args.backend_choice = resolve_backend(args.backend, args.device)
        args.backend = args.backend_choice.name
    check_backend(args.backend, args.device)
    if getattr(args, "low_memory_8bit_unet", False) and args.backend != "mlx":
        raise ValueError(f"--low-memory-8bit-unet: the {args.backend} backend has no quantized path (use --backend mlx)")
    if args.lora_dir is not None and (args.plain_prompts or not Path(args.lora_dir).expanduser().is_dir()):
        raise ValueError(f"--lora-dir: {'has no effect with --plain-prompts' if args.plain_prompts else 'not a folder'}"
                         f" ({args.lora_dir})")


def check_size_flags(args: argparse.Namespace) -> None:
    """--height/--width: multiples of 8 (every Stable Diffusion VAE's factor) within the pixel cap."""
    from .memory_estimate import check_pixel_cap

    height, width = getattr(args, "height", None), getattr(args, "width", None)
    for flag, value in (("--height", height), ("--width", width)):
        if value is not None and value % 8:
            raise ValueError(f"{flag}: must be a multiple of 8, got {value}")
    if height is not None and width is not None:
        check_pixel_cap(height, width, ("--height", "--width"))


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand. Bad input: one line naming the flag, exit 1; usage errors exit 2; Ctrl-C 130."""
    start = time.perf_counter()
    try:
        args = build_parser().parse_args(argv)
        check_before_work(args)
        code = HANDLERS[args.command](args)
    except (BadValue, *EXPECTED_ERRORS) as e:
        print(f"mlx-stablefused: error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # files are written atomically: nothing half-written is left
        print("mlx-stablefused: interrupted", file=sys.stderr)
        return 130
    if args.command not in ("convert", "serve"):
        print(f"done in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
