"""Conversions between PIL images and numpy arrays, normalisation, and grids."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image


def numpy_to_pil(images: np.ndarray) -> list[Image.Image]:
    """(B, H, W, 3) or (H, W, 3) floats in [0, 1] (or uint8) -> list of RGB PIL images."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected images shaped (B, H, W, C) with C in 1/3/4, got {images.shape}")
    if images.dtype != np.uint8:
        images = (np.clip(images, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if images.shape[-1] == 1:
        return [Image.fromarray(im[..., 0], mode="L") for im in images]
    return [Image.fromarray(im) for im in images]


def pil_to_numpy(images: Image.Image | Sequence[Image.Image]) -> np.ndarray:
    """PIL image(s) -> (B, H, W, 3) float32 in [0, 1]."""
    if isinstance(images, Image.Image):
        images = [images]
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"images have different sizes: {sorted(shapes)}")
    return np.stack(arrays)


def normalize(images: np.ndarray) -> np.ndarray:
    """[0, 1] -> [-1, 1], the VAE's input range."""
    return images * 2.0 - 1.0


def denormalize(images: np.ndarray) -> np.ndarray:
    """VAE output (about [-1, 1]) -> [0, 1], clipped."""
    return np.clip(images / 2.0 + 0.5, 0.0, 1.0)


def image_grid(images: Sequence[Image.Image], rows: int, cols: int) -> Image.Image:
    """Paste ``rows * cols`` images row-major into one image (cell size from the first image)."""
    if len(images) != rows * cols:
        raise ValueError(f"a {rows}x{cols} grid needs {rows * cols} images, got {len(images)}")
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid
