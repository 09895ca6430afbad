"""What the command line accepts: argparse types built on the API's validators, and the checks of the
output file, backend and device that must pass before any model loads.

A bad value is refused with one line naming the flag (exit 1), never turned into a default, and never
found only after minutes of generation.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

from .pipelines import inputs

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".gif")
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF",
                 ".tiff": "TIFF", ".gif": "GIF"}  # extension -> Pillow format
IMAGE_SUFFIXES = tuple(IMAGE_FORMATS)
DEVICES = {"mlx": ("gpu", "cpu"), "torch": ("cuda", "mps", "cpu")}
# The API's messages name its parameters; on the command line the same rule names the flag.
FLAGS_FOR_PARAMETERS = {
    "image_height": "--height", "image_width": "--width", "video_height": "--height", "video_width": "--width",
    "video_frames": "--frames", "num_inference_steps": "--steps", "guidance_scale": "--guidance",
    "guidance_rescale": "--guidance-rescale", "num_images_per_prompt": "--num-images",
    "negative_prompt": "--negative-prompt", "start_step": "--start-step", "batch_size": "--batch-size",
    "interpolation_steps": "--interpolation-steps", "num_inpainting_steps": "--num-inpainting-steps",
    "height_translation_per_step": "--translation", "width_translation_per_step": "--translation",
    "motion_adapter=": "--motion-adapter", "overwrite=True": "--overwrite",
    "call enable_context_windows()": "pass --context-length", "enable_context_windows()": "--context-length",
    "enable_tiling()": "--vae-tiling", "enable_attention_slicing()": "--attention-slicing",
    "enable_slicing() (decode one image at a time)": "--vae-slicing",
    # SDXL (cli_sdxl.py)
    **{name: "--" + name.replace("_", "-") for name in (
        "prompt_2", "negative_prompt_2", "original_size", "target_size", "crops_coords_top_left",
        "negative_original_size", "negative_target_size", "negative_crops_coords_top_left", "aesthetic_score",
        "negative_aesthetic_score")},
}
_PARAMETER_PATTERN = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, FLAGS_FOR_PARAMETERS)) + r")(?!\w)")


class InvalidValue(argparse.ArgumentTypeError):
    """A flag's value broke the API's rule; the message already names the flag."""


# ------------------------------------------------------------------------------------ types
def _parse_number(text: str, parse: Callable[[str], Any]) -> Any:
    try:
        return parse(text)
    except ValueError:
        return text  # the validator names the flag and says what it expected


def value_type(flag: str, validator: Callable[[Any, str], Any], parse: Callable[[str], Any] = int) -> Callable:
    """An argparse ``type=``: parse the text, then apply the API's ``validator`` under the flag's name."""

    def convert(text: str) -> Any:
        try:
            return validator(_parse_number(text, parse), flag)
        except ValueError as e:
            raise InvalidValue(str(e)) from None

    convert.__name__ = validator.__name__  # argparse's own fallback message names the type
    return convert


def positive(flag: str) -> Callable:
    return value_type(flag, inputs.positive_int)


def non_negative(flag: str) -> Callable:
    return value_type(flag, inputs.non_negative_int)


def finite(flag: str) -> Callable:
    return value_type(flag, inputs.finite_float, float)


def fraction(flag: str) -> Callable:
    return value_type(flag, inputs.fraction, float)


def one_of(flag: str, names: tuple[str, ...], what: str = "value") -> Callable:
    """A name from ``names``; the refusal lists them all (exit 1, like any bad value)."""

    def check(value: str, name: str) -> str:
        if value not in names:
            raise ValueError(f"{name}: unknown {what} {value!r}; valid names: {', '.join(names)}")
        return value

    return value_type(flag, check, str)


# ------------------------------------------------------------------------ before generating
def output_paths(output: str, n: int) -> list[Path]:
    """The files ``n`` images go to: ``output`` itself for one, else -0, -1 ... before the extension."""
    path = Path(output)
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(n)]


def check_output(output: str, video: bool, count: int = 1) -> None:
    """The output's extension fits the subcommand, and every file it names can be written."""
    path = Path(output)
    if path.is_dir():
        raise ValueError(f"--output: {path} is a directory; give a file name")
    suffix = path.suffix.lower()
    allowed, other = (VIDEO_SUFFIXES, IMAGE_SUFFIXES) if video else (IMAGE_SUFFIXES, VIDEO_SUFFIXES)
    if suffix not in allowed:
        kind = "a video" if video else "images"
        hint = f" ({'an image' if video else 'a video'} extension)" if suffix in other else ""
        raise ValueError(f"--output: {path.name} ends in {suffix or 'no extension'}{hint}; this subcommand writes "
                         f"{kind}: use one of {', '.join(allowed)}")
    if video and suffix != ".gif" and not all(importlib.util.find_spec(m) for m in ("imageio", "imageio_ffmpeg")):
        raise ValueError(f"--output: writing {suffix} needs imageio-ffmpeg (pip install 'mlx-stablefused[video]'); "
                         "or write a .gif")
    for target in output_paths(output, count):
        if target.is_dir():
            raise ValueError(f"--output: {target} is a directory; give a file name")
        check_writable_folder(target.parent)


def check_writable_folder(folder: Path) -> None:
    """The nearest existing folder of ``folder`` accepts a new file (probed, so it holds for root too)."""
    existing = folder if str(folder) else Path(".")
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--output: {existing} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".mlx-stablefused-probe.", dir=existing)
    except OSError as e:
        raise ValueError(f"--output: cannot create a file in {existing} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(probe)


def check_input_image(path: str, flag: str) -> None:
    """An input image exists and decodes, so a typo is not found after the model has loaded."""
    try:
        inputs.open_image(path)
    except FileNotFoundError:
        raise ValueError(f"{flag}: No such file: {path}") from None
    except (ValueError, IsADirectoryError, PermissionError) as e:
        raise ValueError(f"{flag}: {e}") from None


def check_backend(backend: str, device: str | None) -> None:
    """The backend is installed and the device exists on this machine."""
    if device is not None:
        kind = device.split(":")[0]
        if kind not in DEVICES[backend]:
            raise ValueError(f"--device: the {backend} backend runs on {', '.join(DEVICES[backend])}, "
                             f"not {device!r}")
    if backend == "mlx" and device == "gpu":
        import mlx.core as mx

        if not mx.is_available(mx.gpu):
            raise ValueError("--device gpu: this MLX build has no GPU backend; use --device cpu")
    if backend == "torch":
        try:
            import torch
        except ImportError:
            raise ValueError("--backend torch: PyTorch is not installed (pip install torch), "
                             "or use --backend mlx") from None
        if device and device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {device}: this machine has no CUDA device; use --device cpu")
        if device == "mps" and not torch.backends.mps.is_available():
            raise ValueError("--device mps: this machine has no MPS device; use --device cpu")


def describe_os_error(error: OSError) -> str:
    """A failed file operation in words, pointing at MLX_STABLEFUSED_CACHE when the cache is the culprit."""
    from .sources import cache_root

    if error.errno is None or error.filename is None:
        return str(error)
    text = f"{error.filename}: {error.strerror}"
    cache = cache_root()
    if Path(error.filename) == cache or cache in Path(error.filename).parents:
        text += (f" (the model cache {cache} must be writable: set MLX_STABLEFUSED_CACHE to a folder you can "
                 "write, or free some space)")
    return text


def one_line(error: BaseException) -> str:
    """An error message on a single line, as the command line promises, naming flags, not API parameters."""
    text = describe_os_error(error) if isinstance(error, OSError) else str(error)
    text = _PARAMETER_PATTERN.sub(lambda m: FLAGS_FOR_PARAMETERS[m.group(1)], " ".join(text.split("\n")).strip())
    return text or type(error).__name__


__all__ = ["InvalidValue", "value_type", "positive", "non_negative", "finite", "fraction", "one_of", "output_paths",
           "IMAGE_FORMATS", "IMAGE_SUFFIXES", "VIDEO_SUFFIXES",
           "check_output", "check_writable_folder", "check_input_image", "check_backend", "describe_os_error",
           "one_line"]
