"""Utilities under stablefused's names: interpolation, image/array conversions, grids, gif and video
files, the model cache and scheduler lookup."""

from ..schedulers import resolve_scheduler
from .images import (denormalize, image_grid, normalize, numpy_to_pil, numpy_to_pt, pil_to_gif, pil_to_numpy,
                     pil_to_video, pt_to_numpy, write_text_on_image)
from .interpolation import lerp, slerp
from .model_cache import load_model_from_cache, save_model_to_cache

__all__ = ["denormalize", "image_grid", "lerp", "load_model_from_cache", "normalize", "numpy_to_pil", "numpy_to_pt",
           "pil_to_numpy", "pil_to_video", "pil_to_gif", "pt_to_numpy", "resolve_scheduler", "save_model_to_cache",
           "slerp", "write_text_on_image"]
