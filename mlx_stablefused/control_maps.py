"""Control maps for ControlNets made from an image. Canny edges come from OpenCV (``pip install
'mlx-stablefused[controlnet]'``), the implementation lllyasviel's ControlNet annotator uses; depth, pose,
line-art and other maps come from their own detectors and are passed in as images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .validation import finite_float


def canny_image(image: Image.Image | np.ndarray | str | Path, low_threshold: float = 100,
                high_threshold: float = 200) -> Image.Image:
    """Canny edges of ``image`` (a PIL image, a path, or an (H, W, 3) uint8 array) as the RGB control image the
    canny ControlNets take (white edges on black): ``cv2.Canny(rgb, low_threshold, high_threshold)`` on the
    image's RGB pixels, the same map in all three channels, as diffusers' ControlNet examples make it."""
    cv2 = _opencv()
    low = finite_float(low_threshold, "low_threshold")
    high = finite_float(high_threshold, "high_threshold")
    if not 0 <= low <= high:
        raise ValueError(f"canny thresholds must satisfy 0 <= low_threshold <= high_threshold, got {low}, {high}")
    pixels = _rgb_uint8(image)
    edges = cv2.Canny(pixels, low, high)
    return Image.fromarray(np.repeat(edges[..., None], 3, axis=2))


def _opencv() -> Any:
    """``cv2``, imported leaving the environment as it was (its import sets LD_LIBRARY_PATH for itself, which
    a running process does not read again)."""
    import os

    before = os.environ.get("LD_LIBRARY_PATH")
    try:
        import cv2
    except ImportError as e:
        raise ImportError("canny_image needs OpenCV: pip install 'mlx-stablefused[controlnet]' "
                          "(opencv-python-headless)") from e
    finally:
        if before is None:
            os.environ.pop("LD_LIBRARY_PATH", None)
        else:
            os.environ["LD_LIBRARY_PATH"] = before
    return cv2


def _rgb_uint8(image: Any) -> np.ndarray:
    if isinstance(image, (str, Path)):
        from .pipelines.inputs import open_image

        image = open_image(image)
    if isinstance(image, Image.Image):
        return np.ascontiguousarray(np.asarray(image.convert("RGB")))
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"canny_image takes a PIL image, a path or an (H, W, 3) uint8 array, got "
                         f"{arr.dtype} {arr.shape}")
    return np.ascontiguousarray(arr)
