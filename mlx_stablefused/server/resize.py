"""AUTOMATIC1111's ways of bringing an image (img2img's ``resize_mode``) or a latent (the hires fix's "Latent"
upscalers) to another size."""

from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image

from .images import FieldError

# img2img's resize_mode: 0 just resize, 1 crop and resize, 2 resize and fill, 3 just resize (latent upscale).
RESIZE_MODES = {0: "Just resize", 1: "Crop and resize", 2: "Resize and fill", 3: "Just resize (latent upscale)"}
LANCZOS = Image.Resampling.LANCZOS


def just_resize(image: Image.Image, width: int, height: int) -> Image.Image:
    return image if image.size == (width, height) else image.resize((width, height), LANCZOS)


def crop_and_resize(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scaled to cover ``width x height``, the overflow cropped evenly from both sides."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio > src_ratio else image.width * height // image.height
    src_h = height if ratio <= src_ratio else image.height * width // image.width
    out = Image.new("RGB", (width, height))
    out.paste(just_resize(image, src_w, src_h), ((width - src_w) // 2, (height - src_h) // 2))
    return out


def resize_and_fill(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scaled to fit inside, the empty bands filled with the image's edge rows (or columns) stretched."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio < src_ratio else image.width * height // image.height
    src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = just_resize(image, src_w, src_h)
    out = Image.new("RGB", (width, height))
    out.paste(resized, ((width - src_w) // 2, (height - src_h) // 2))
    if ratio < src_ratio:  # bands above and below
        band = height // 2 - src_h // 2
        if band > 0:
            out.paste(resized.resize((width, band), box=(0, 0, width, 0)), (0, 0))
            out.paste(resized.resize((width, band), box=(0, resized.height, width, resized.height)),
                      (0, band + src_h))
    elif ratio > src_ratio:  # bands left and right
        band = width // 2 - src_w // 2
        if band > 0:
            out.paste(resized.resize((band, height), box=(0, 0, 0, height)), (0, 0))
            out.paste(resized.resize((band, height), box=(resized.width, 0, resized.width, height)),
                      (band + src_w, 0))
    return out


def latent_source_size(image: Image.Image) -> Image.Image:
    """resize_mode 3 encodes the image at its own size; the VAE needs sides that are multiples of 8."""
    return just_resize(image, max(8, image.width // 8 * 8), max(8, image.height // 8 * 8))


IMAGE_RESIZERS: dict[int, Callable[[Image.Image, int, int], Image.Image]] = {
    0: just_resize, 1: crop_and_resize, 2: resize_and_fill}


def _source_positions(out_size: int, in_size: int, mode: str) -> np.ndarray:
    scale = in_size / out_size
    dst = np.arange(out_size, dtype=np.float64)
    if mode == "nearest":  # torch's legacy 'nearest'
        return np.minimum(np.floor(dst * scale), in_size - 1)
    if mode == "nearest-exact":
        return np.minimum(np.floor((dst + 0.5) * scale), in_size - 1)
    return np.maximum((dst + 0.5) * scale - 0.5, 0.0)  # bilinear, align_corners=False


def _resample_axis(x: np.ndarray, out_size: int, axis: int, mode: str) -> np.ndarray:
    in_size = x.shape[axis]
    src = _source_positions(out_size, in_size, mode)
    if mode != "bilinear":
        return np.take(x, src.astype(np.int64), axis=axis)
    low = np.floor(src).astype(np.int64)
    high = np.minimum(low + 1, in_size - 1)
    frac = (src - low).astype(np.float32)
    shape = [1] * x.ndim
    shape[axis] = out_size
    frac = frac.reshape(shape)
    return np.take(x, low, axis=axis) * (1 - frac) + np.take(x, high, axis=axis) * frac


def interpolate_latent(latent: np.ndarray, height: int, width: int, mode: str = "bilinear") -> np.ndarray:
    """(B, C, h, w) -> (B, C, height, width) as ``torch.nn.functional.interpolate`` (what A1111's "Latent"
    upscalers call): "bilinear" (align_corners=False), "nearest" or "nearest-exact"."""
    out = _resample_axis(np.asarray(latent, dtype=np.float32), height, 2, mode)
    return np.ascontiguousarray(_resample_axis(out, width, 3, mode), dtype=np.float32)


# The hires fix's upscalers: A1111's name -> ("latent", torch mode) or ("image", PIL resample).
HR_UPSCALERS: dict[str, tuple[str, object]] = {
    "Latent": ("latent", "bilinear"),
    "Latent (nearest)": ("latent", "nearest"),
    "Latent (nearest-exact)": ("latent", "nearest-exact"),
    "None": ("image", LANCZOS),  # A1111's "None" upscaler leaves the final resize to Lanczos
    "Lanczos": ("image", LANCZOS),
    "Nearest": ("image", Image.Resampling.NEAREST),
}


def hr_upscaler(name: str | None) -> tuple[str, object]:
    key = name or "Latent"  # A1111's default
    if key not in HR_UPSCALERS:
        raise FieldError("hr_upscaler", f"unknown or unavailable upscaler {name!r}; available: "
                                        f"{', '.join(HR_UPSCALERS)}")
    return HR_UPSCALERS[key]
