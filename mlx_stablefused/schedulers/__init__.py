"""Samplers by stablefused name, configured from a model's scheduler_config.json."""

from __future__ import annotations

from typing import Any, Mapping

from .base import Scheduler
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .deis import DEISScheduler
from .dpm_solver import DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler
from .euler import EulerAncestralScheduler, EulerScheduler, LMSScheduler
from .lcm import LCMScheduler
from .pndm import PNDMScheduler
from .two_stage import DPMSolverSDEScheduler, HeunScheduler, KDPM2AncestralScheduler, KDPM2Scheduler
from .unipc import UniPCScheduler

KARRAS = {"use_karras_sigmas": True}

# name -> (class, the overrides the name stands for, diffusers class, recommended steps)
SCHEDULERS: dict[str, tuple[type[Scheduler], dict[str, Any], str, str]] = {
    "ddim": (DDIMScheduler, {}, "DDIMScheduler", "25-50"),
    "ddpm": (DDPMScheduler, {}, "DDPMScheduler", "100-1000"),
    "deis": (DEISScheduler, {}, "DEISMultistepScheduler", "15-25"),
    "dpm2": (KDPM2Scheduler, {}, "KDPM2DiscreteScheduler", "15-30 (x2 evaluations)"),
    "dpm2_ancestral": (KDPM2AncestralScheduler, {}, "KDPM2AncestralDiscreteScheduler", "20-30 (x2 evaluations)"),
    "dpm2_karras": (KDPM2Scheduler, KARRAS, "KDPM2DiscreteScheduler(use_karras_sigmas=True)", "15-30 (x2)"),
    "dpm2_karras_ancestral": (KDPM2AncestralScheduler, KARRAS,
                              "KDPM2AncestralDiscreteScheduler(use_karras_sigmas=True)", "20-30 (x2)"),
    "dpm_sde": (DPMSolverSDEScheduler, {}, "DPMSolverSDEScheduler", "15-25 (x2 evaluations)"),
    "dpm_sde_karras": (DPMSolverSDEScheduler, KARRAS, "DPMSolverSDEScheduler(use_karras_sigmas=True)", "15-25 (x2)"),
    "dpm_multistep": (DPMSolverMultistepScheduler, {}, "DPMSolverMultistepScheduler", "15-25"),
    "dpm_multistep_karras": (DPMSolverMultistepScheduler, KARRAS,
                             "DPMSolverMultistepScheduler(use_karras_sigmas=True)", "15-25"),
    "dpm_singlestep": (DPMSolverSinglestepScheduler, {}, "DPMSolverSinglestepScheduler", "15-25"),
    "dpm_singlestep_karras": (DPMSolverSinglestepScheduler, KARRAS,
                              "DPMSolverSinglestepScheduler(use_karras_sigmas=True)", "15-25"),
    "euler": (EulerScheduler, {}, "EulerDiscreteScheduler", "20-30"),
    "euler_ancestral": (EulerAncestralScheduler, {}, "EulerAncestralDiscreteScheduler", "20-40"),
    "heun": (HeunScheduler, {}, "HeunDiscreteScheduler", "15-30 (x2 evaluations)"),
    "lcm": (LCMScheduler, {}, "LCMScheduler (LCM-distilled models only)", "2-8"),
    "linear_multistep": (LMSScheduler, {}, "LMSDiscreteScheduler", "30-50"),
    "pndm": (PNDMScheduler, {}, "PNDMScheduler", "25-50"),
    "unipc": (UniPCScheduler, {}, "UniPCMultistepScheduler", "10-20"),
}

SCHEDULER_NAMES: tuple[str, ...] = tuple(sorted(SCHEDULERS))

# diffusers class name in a scheduler_config.json -> our name (a model's default sampler).
DIFFUSERS_CLASS_NAMES: dict[str, str] = {
    "DDIMScheduler": "ddim",
    "DDPMScheduler": "ddpm",
    "DEISMultistepScheduler": "deis",
    "DPMSolverMultistepScheduler": "dpm_multistep",
    "DPMSolverSinglestepScheduler": "dpm_singlestep",
    "DPMSolverSDEScheduler": "dpm_sde",
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "EulerDiscreteScheduler": "euler",
    "HeunDiscreteScheduler": "heun",
    "KDPM2AncestralDiscreteScheduler": "dpm2_ancestral",
    "KDPM2DiscreteScheduler": "dpm2",
    "LCMScheduler": "lcm",
    "LMSDiscreteScheduler": "linear_multistep",
    "PNDMScheduler": "pndm",
    "UniPCMultistepScheduler": "unipc",
}


def make_scheduler(name: str, config: Mapping[str, Any] | None = None, **overrides: Any) -> Scheduler:
    """Build the sampler called ``name`` from a diffusers scheduler config plus keyword overrides."""
    key = str(getattr(name, "value", name)).lower()
    if key not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; valid names: {', '.join(SCHEDULER_NAMES)}")
    cls, preset, _, _ = SCHEDULERS[key]
    return cls(config, **{**preset, **overrides})


def resolve_scheduler(scheduler_type: Any, config: Mapping[str, Any] | None = None) -> Scheduler:
    """stablefused's name for ``make_scheduler``: a ``Scheduler`` enum member or name and a scheduler config
    (an unknown name raises, where stablefused returned None)."""
    return make_scheduler(scheduler_type, config)


def default_scheduler_name(config: Mapping[str, Any] | None) -> str:
    """The sampler a model ships with (its ``_class_name``), or DDIM when we do not know that class."""
    class_name = (config or {}).get("_class_name", "")
    return DIFFUSERS_CLASS_NAMES.get(class_name, "ddim")


__all__ = ["Scheduler", "SCHEDULERS", "SCHEDULER_NAMES", "make_scheduler", "resolve_scheduler", "default_scheduler_name"]
