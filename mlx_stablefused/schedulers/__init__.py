"""Samplers by stablefused name, configured from a model's scheduler_config.json."""

from __future__ import annotations

from typing import Any, Mapping

from .base import Scheduler
from .ddim import DDIMScheduler
from .euler import EulerScheduler
from .pndm import PNDMScheduler

# name -> (class, overrides that define the name), as stablefused maps its names.
SCHEDULERS: dict[str, tuple[type[Scheduler], dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerScheduler, {}),
    "pndm": (PNDMScheduler, {}),
}

SCHEDULER_NAMES: tuple[str, ...] = tuple(sorted(SCHEDULERS))

# diffusers class name in a scheduler_config.json -> our name (used for a model's default sampler).
DIFFUSERS_CLASS_NAMES: dict[str, str] = {
    "DDIMScheduler": "ddim",
    "EulerDiscreteScheduler": "euler",
    "PNDMScheduler": "pndm",
}


def make_scheduler(name: str, config: Mapping[str, Any] | None = None, **overrides: Any) -> Scheduler:
    """Build the sampler called ``name`` from a diffusers scheduler config plus keyword overrides."""
    key = str(getattr(name, "value", name)).lower()
    if key not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; valid names: {', '.join(SCHEDULER_NAMES)}")
    cls, preset = SCHEDULERS[key]
    return cls(config, **{**preset, **overrides})


def default_scheduler_name(config: Mapping[str, Any] | None) -> str:
    """The sampler a model ships with (its ``_class_name``), or DDIM when we do not implement that class."""
    class_name = (config or {}).get("_class_name", "")
    return DIFFUSERS_CLASS_NAMES.get(class_name, "ddim")


__all__ = ["Scheduler", "SCHEDULERS", "SCHEDULER_NAMES", "make_scheduler", "default_scheduler_name"]
