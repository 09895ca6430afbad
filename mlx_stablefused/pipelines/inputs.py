"""Checking and preparing what a caller passes: numbers, sizes, prompts, images, masks, seeds.

Every pipeline validates here, before any work starts, so one rule gives one message everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ..backends.base import as_numpy
from ..utils.array_types import is_mlx, is_torch
from ..utils.images import numpy_to_pil
from ..validation import finite_float, fraction, non_negative_int, positive_int  # noqa: F401  (shared rules)

PromptType = str | Sequence[str]
OUTPUT_TYPES = ("pil", "np", "latent")


# ------------------------------------------------------------------------------- sizes and steps
def check_size(height: Any, width: Any, factor: int, names: tuple[str, str] = ("image_height", "image_width")) -> None:
    """Both positive integers and multiples of the VAE's downscale ``factor``."""
    for name, v in zip(names, (height, width)):
        positive_int(v, name)
        if v % factor:
            raise ValueError(f"{name}={v} is not a multiple of {factor} (the VAE's downscale factor)")


TORCH_OUTPUT = "pt"  # a torch tensor (B, 3, H, W) on every backend, as stablefused returned


def check_output_type(output_type: Any, native: str) -> None:
    allowed = OUTPUT_TYPES + tuple(dict.fromkeys((native, TORCH_OUTPUT)))
    if output_type not in allowed:
        raise ValueError(f"unknown output_type {output_type!r}; expected one of {allowed}")
    if output_type == TORCH_OUTPUT and native != TORCH_OUTPUT:
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            raise ImportError("output_type='pt' returns a torch tensor and needs PyTorch (pip install torch); "
                              f"without it use 'np' or {native!r}")


def requested_size(height: int | None, width: int | None, factor: int) -> tuple[int, int] | None:
    """``(height, width)`` to resize inputs to, or None to keep their size; both or neither must be given."""
    if height is None and width is None:
        return None
    if height is None or width is None:
        raise ValueError("pass both image_height and image_width to resize, or neither")
    check_size(height, width, factor)
    return int(height), int(width)


def start_index(num_inference_steps: int, start_step: Any, strength: Any, order: int) -> int:
    """Table index where a partial schedule starts: stablefused's ``start_step`` or diffusers' ``strength``.

    Both count sampler steps; a sampler of ``order`` 2 has two table entries per step.
    """
    n = int(num_inference_steps)
    if start_step is not None and strength is not None:
        raise ValueError("pass start_step or strength, not both")
    if strength is not None:
        keep = min(int(n * fraction(strength, "strength")), n)
        if keep == 0:
            raise ValueError(f"strength={strength} with {n} steps leaves no denoising step; raise either")
        first = n - keep
    else:
        first = 0 if start_step is None else start_step
        if not isinstance(first, (int, np.integer)) or isinstance(first, bool) or not 0 <= first < n:
            raise ValueError(f"start_step must be an integer in [0, {n - 1}] for {n} steps, got {start_step!r}")
    return int(first) * order


# -------------------------------------------------------------------------------------- prompts
def as_prompt_list(prompt: PromptType, name: str = "prompt") -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise TypeError(f"{name} must be a string or a non-empty list of strings, got {prompt!r:.80}")


def prompt_pairs(prompt: PromptType, negative_prompt: PromptType | None) -> tuple[list[str], list[str]]:
    """One negative prompt per prompt: "" when none is given, a single string repeated."""
    prompts = as_prompt_list(prompt)
    if negative_prompt is None:
        return prompts, [""] * len(prompts)
    if isinstance(negative_prompt, str):
        return prompts, [negative_prompt] * len(prompts)
    negatives = as_prompt_list(negative_prompt, "negative_prompt")
    if len(negatives) != len(prompts):
        raise ValueError(f"{len(prompts)} prompt(s) but {len(negatives)} negative prompt(s); "
                         "pass one negative prompt per prompt, or a single string")
    return prompts, negatives


def expand_prompts(prompt: PromptType, negative_prompt: PromptType | None, per_prompt: Any,
                   name: str = "num_images_per_prompt") -> tuple[list[str], list[str]]:
    """Prompt pairs, each repeated ``per_prompt`` times in diffusers' order (p0, p0, p1, ...)."""
    k = positive_int(per_prompt, name)
    prompts, negatives = prompt_pairs(prompt, negative_prompt)
    return [p for p in prompts for _ in range(k)], [n for n in negatives for _ in range(k)]


def per_step(value: Any, n: int, name: str, count_name: str) -> list:
    """One value for every one of ``n`` steps, or a list with one per step."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        return [value] * n
    if len(value) != n:
        raise ValueError(f"{name} has {len(value)} entries for {count_name}={n}; give one, or one per step")
    return list(value)


# ---------------------------------------------------------------------------------------- noise
def make_rng(seed: int | np.random.Generator | None) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(None if seed is None else non_negative_int(seed, "seed"))


def random_latent(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def given_or_random(array: Any, shape: tuple[int, ...], rng: np.random.Generator, name: str) -> np.ndarray:
    """``array`` (checked against ``shape``, finite) as float32 numpy, or a fresh standard-normal draw."""
    if array is None:
        return random_latent(shape, rng)
    out = as_numpy(array)  # numpy, an mx.array, or a torch tensor (requiring grad, on a GPU)
    if out.shape != tuple(shape):
        raise ValueError(f"{name} has shape {out.shape}; expected {tuple(shape)}")
    if not np.isfinite(out).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return out


# --------------------------------------------------------------------------------------- images
def open_image(path: str | Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise ValueError(f"could not read image file {path}: {e}") from e


def load_pixels(image: Any, size: tuple[int, int] | None = None, mode: str = "RGB") -> np.ndarray:
    """Path / PIL / list / numpy -> (B, H, W, C) float32 in [0, 1]; C is 3 for RGB, 1 for "L"."""
    channels = 3 if mode == "RGB" else 1
    items = image if isinstance(image, (list, tuple)) else [image]
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 2 and channels == 1:
            arr = arr[None, ..., None]
        elif arr.ndim == 3 and (arr.shape[-1] == channels or channels == 1 and arr.shape[-1] != 3):
            arr = arr[None] if arr.shape[-1] == channels else arr[..., None]
        if arr.ndim != 4 or arr.shape[-1] != channels:
            raise ValueError(f"{'image' if channels == 3 else 'mask'} arrays must be (B, H, W, {channels}) "
                             f"or (H, W{', 3' if channels == 3 else ''}), got {image.shape}")
        if arr.dtype == np.uint8:
            arr = arr.astype(np.float32) / 255.0
        else:
            arr = arr.astype(np.float32)
            if arr.size and not np.isfinite(arr).all():
                raise ValueError("image arrays must not contain NaN or infinite values")
            if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
                raise ValueError("float image arrays must be in [0, 1]")
        if size is not None and arr.shape[1:3] != tuple(size):
            return load_pixels(numpy_to_pil(arr), size, mode)
        return arr
    if not items:
        raise ValueError("no images given")
    pils = []
    for item in items:
        if isinstance(item, (str, Path)):
            item = open_image(item)
        if not isinstance(item, Image.Image):
            raise TypeError(f"images must be paths, PIL images or numpy arrays, got {type(item).__name__}")
        item = item.convert(mode)
        if size is not None and item.size != (size[1], size[0]):
            item = item.resize((size[1], size[0]), Image.LANCZOS)  # PIL sizes are (width, height)
        pils.append(item)
    arrays = [np.asarray(p, dtype=np.float32).reshape(p.size[1], p.size[0], channels) / 255.0 for p in pils]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"images have different sizes: {sorted(shapes)}; pass image_height/image_width")
    return np.stack(arrays)


def tensor_pixels(image: Any) -> np.ndarray | None:
    """A torch tensor or ``mx.array`` (B, 3, H, W) or (3, H, W) as diffusers reads a tensor: values in [0, 1], or in [-1, 1] when
    any is negative (taken as is, as stablefused fed tensors to the VAE) -> (B, H, W, 3) on the [0, 1]
    scale (the encoder maps it back exactly). None for anything else."""
    if not (is_torch(image) or is_mlx(image)):
        return None
    arr = as_numpy(image)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[1] != 3:
        raise ValueError(f"image tensors must be (B, 3, H, W) or (3, H, W), got {tuple(arr.shape)}")
    if not np.isfinite(arr).all():
        raise ValueError("image tensors must not contain NaN or infinite values")
    if arr.min() < 0:
        arr = (arr + 1.0) / 2.0
    return np.ascontiguousarray(arr.transpose(0, 2, 3, 1))


def load_image(image: Any, factor: int, size: tuple[int, int] | None = None) -> np.ndarray:
    """An image or batch -> (B, H, W, 3) float32 in [0, 1], resized to ``size`` or a multiple of ``factor``;
    torch tensors as ``tensor_pixels`` reads them."""
    pixels = tensor_pixels(image)
    if pixels is not None and size is not None and pixels.shape[1:3] != tuple(size):
        pixels = load_pixels(np.clip(pixels, 0.0, 1.0), size)
    pixels = load_pixels(image, size) if pixels is None else pixels
    h, w = pixels.shape[1:3]
    if h % factor or w % factor:
        raise ValueError(f"image is {w}x{h} (width x height); both must be multiples of {factor}. "
                         "Pass image_height/image_width to resize it.")
    return pixels


def load_mask(mask: Any, size: tuple[int, int], resize: bool = False) -> np.ndarray:
    """Grayscale mask(s) -> (B, H, W, 1) of 0/1, binarised at 0.5; resized to ``size`` only if asked."""
    values = load_pixels(mask, size if resize else None, mode="L")
    if values.shape[1:3] != tuple(size):
        raise ValueError(f"mask is {values.shape[2]}x{values.shape[1]} but the image is {size[1]}x{size[0]} "
                         "(width x height); they must match (or pass image_height/image_width to resize both)")
    return (values >= 0.5).astype(np.float32)


def match_batch(pixels: np.ndarray, num_prompts: int, per_prompt: int, name: str) -> np.ndarray:
    """One image for every prompt, or one per prompt; then repeated ``per_prompt`` times."""
    if pixels.shape[0] == 1:
        return np.repeat(pixels, num_prompts * per_prompt, axis=0)
    if pixels.shape[0] != num_prompts:
        raise ValueError(f"{pixels.shape[0]} {name}s for {num_prompts} prompts; pass one {name}, or one per prompt")
    return np.repeat(pixels, per_prompt, axis=0)
