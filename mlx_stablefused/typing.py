"""stablefused's enums and type aliases (``stablefused.typing``), for code written against it.

``Scheduler`` names every sampler ``set_scheduler`` takes (stablefused's 17, plus ``dpm2``,
``dpm2_ancestral`` and ``lcm``); as a ``str`` enum its members equal their names. ``InpaintWalkType`` is
the walk's ``WalkType``. The aliases describe what this port's pipelines accept and return.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, List, Sequence, Union

import numpy as np
from PIL import Image

from .pipelines.walk_geometry import WalkType
from .schedulers import SCHEDULER_NAMES
from .schedulers.base import Scheduler as SamplerBase

Scheduler = Enum("Scheduler", {name.upper(): name for name in SCHEDULER_NAMES}, type=str)
Scheduler.__doc__ = "Sampler names for set_scheduler(); str-valued, so Scheduler.DDIM == 'ddim'."
InpaintWalkType = WalkType

ImageType = Union[str, Image.Image, List[Image.Image], np.ndarray, Any]  # paths, PIL, numpy NHWC, torch NCHW
OutputType = Union[List[Image.Image], np.ndarray, Any]  # "pil", "np"/"latent", or a native / torch array
PromptType = Union[str, Sequence[str]]
SchedulerType = SamplerBase  # every sampler of this port (schedulers/) derives from it
UNetType = Any  # the backend's own UNet module (MLX or torch), built from the model's config

__all__ = ["Scheduler", "InpaintWalkType", "ImageType", "OutputType", "PromptType", "SchedulerType", "UNetType"]
