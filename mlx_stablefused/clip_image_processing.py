"""Images -> an image encoder's pixel values, as transformers' CLIPImageProcessor makes them.

The shortest side resized to the encoder's ``image_size`` (PIL bicubic), a centred square crop, then
``(x / 255 - mean) / std`` with CLIP's mean and std, float32, channels first (transformers' layout).
diffusers' ``load_ip_adapter`` builds exactly this processor (``size`` = ``crop_size`` = the encoder's
``image_size``) when a pipeline has none. This module imports no framework.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's, as transformers' OPENAI_CLIP_MEAN
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def as_pil(image: Any, name: str = "ip_adapter_image") -> Image.Image:
    """A path, a PIL image, or an (H, W, 3) array (uint8, or float in [0, 1]) -> an RGB PIL image."""
    from .pipelines.inputs import open_image
    from .utils.images import numpy_to_pil

    if isinstance(image, (str, Path)):
        image = open_image(image)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"{name} arrays must be (H, W, 3), got shape {image.shape}")
        if image.dtype != np.uint8:
            if not np.isfinite(image).all() or image.min() < 0 or image.max() > 1:
                raise ValueError(f"float {name} arrays must hold finite values in [0, 1]")
            image = numpy_to_pil(image[None].astype(np.float32))[0]
        else:
            image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"{name} must be a path, a PIL image or an (H, W, 3) array, got {type(image).__name__}")
    return image.convert("RGB")


def shortest_side_size(width: int, height: int, side: int) -> tuple[int, int]:
    """(width, height) with the shortest side ``side`` and the aspect kept (transformers truncates the long one)."""
    if width <= height:
        return side, int(side * height / width)
    return int(side * width / height), side


def clip_pixels(images: Sequence[Any], size: int, crop_size: int | None = None) -> np.ndarray:
    """Images -> (N, 3, crop, crop) float32 pixel values for a CLIP image encoder of ``image_size`` ``size``."""
    crop = size if crop_size is None else crop_size
    mean, std = np.asarray(CLIP_MEAN, np.float32), np.asarray(CLIP_STD, np.float32)
    out = []
    for image in images:
        pil = as_pil(image)
        pil = pil.resize(shortest_side_size(*pil.size, size), Image.BICUBIC)
        arr = np.asarray(pil)
        top, left = (arr.shape[0] - crop) // 2, (arr.shape[1] - crop) // 2
        arr = arr[top:top + crop, left:left + crop]
        scaled = (arr.astype(np.float64) * (1 / 255)).astype(np.float32)
        out.append(((scaled - mean) / std).transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(out))
