"""AUTOMATIC1111's sampler and schedule-type names, mapped onto this port's samplers.

Since A1111 1.9 a sampler ("DPM++ 2M") and a schedule type ("Karras") are chosen separately; the older
combined names ("DPM++ 2M Karras") and the k-diffusion aliases ("k_dpmpp_2m_ka") still work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class A1111Sampler:
    name: str                    # A1111's label
    ours: str                    # this port's sampler
    aliases: tuple[str, ...]     # A1111's aliases
    karras: bool = True          # schedule type "Karras" applies (our use_karras_sigmas=True)
    overrides: dict[str, Any] = field(default_factory=dict)  # sampler options the A1111 name stands for
    automatic_karras: bool = False  # A1111's default schedule for this sampler is Karras


SAMPLERS: tuple[A1111Sampler, ...] = (
    A1111Sampler("DPM++ 2M", "dpm_multistep", ("k_dpmpp_2m",), automatic_karras=True),
    A1111Sampler("DPM++ SDE", "dpm_sde", ("k_dpmpp_sde",), automatic_karras=True),
    A1111Sampler("DPM++ 2M SDE", "dpm_multistep", ("k_dpmpp_2m_sde",), overrides={"algorithm_type": "sde-dpmsolver++"}),
    A1111Sampler("Euler a", "euler_ancestral", ("k_euler_a", "k_euler_ancestral")),
    A1111Sampler("Euler", "euler", ("k_euler",)),
    A1111Sampler("LMS", "linear_multistep", ("k_lms",)),
    A1111Sampler("Heun", "heun", ("k_heun",)),
    A1111Sampler("DPM2", "dpm2", ("k_dpm_2",)),
    A1111Sampler("DPM2 a", "dpm2_ancestral", ("k_dpm_2_a",)),
    A1111Sampler("DEIS", "deis", ("deis",)),
    A1111Sampler("UniPC", "unipc", ("unipc",)),
    A1111Sampler("DDIM", "ddim", ("ddim",), karras=False),
    A1111Sampler("DDPM", "ddpm", ("ddpm",), karras=False),
    A1111Sampler("PLMS", "pndm", ("plms",), karras=False),
    A1111Sampler("LCM", "lcm", ("k_lcm",), karras=False),
)

# A1111's schedule types this port has: (name, label). "automatic" is the sampler's own default.
SCHEDULES: tuple[tuple[str, str], ...] = (("automatic", "Automatic"), ("uniform", "Uniform"), ("karras", "Karras"))
_SCHEDULE_NAMES = {key for pair in SCHEDULES for key in (pair[0], pair[1].lower())}
_BY_NAME = {key.lower(): s for s in SAMPLERS for key in (s.name, *s.aliases)}
_BY_NAME.update({f"{s.name} karras".lower(): s for s in SAMPLERS if s.karras})
_BY_NAME.update({f"{alias}_ka": s for s in SAMPLERS if s.karras for alias in s.aliases if alias.startswith("k_")})


@dataclass(frozen=True)
class SamplerChoice:
    label: str          # A1111's sampler name, as written to the infotext
    schedule: str       # "Automatic", "Uniform" or "Karras"
    ours: str
    overrides: dict[str, Any]


def choose_sampler(sampler_name: str | None, scheduler: str | None) -> SamplerChoice:
    """Our sampler for A1111's ``sampler_name`` and ``scheduler``; ValueError naming the field otherwise."""
    name = (sampler_name or "Euler").strip()  # A1111's default (its sampler_index field's)
    sampler = _BY_NAME.get(name.lower())
    if sampler is None:
        raise ValueError(f"sampler_name: unknown sampler {sampler_name!r}; known: "
                         f"{', '.join(s.name for s in SAMPLERS)}")
    schedule = (scheduler or "automatic").strip().lower()
    if schedule not in _SCHEDULE_NAMES:
        raise ValueError(f"scheduler: unknown schedule type {scheduler!r}; known: "
                         f"{', '.join(label for _, label in SCHEDULES)}")
    karras = name.lower().endswith("karras") or name.lower().endswith("_ka") or schedule == "karras" or (
        schedule == "automatic" and sampler.automatic_karras)
    if karras and not sampler.karras:
        raise ValueError(f"scheduler: schedule type Karras does not apply to sampler {sampler.name!r}")
    overrides = {**sampler.overrides, **({"use_karras_sigmas": True} if karras else {})}
    return SamplerChoice(sampler.name, "Karras" if karras else "Automatic" if schedule == "automatic" else "Uniform",
                         sampler.ours, overrides)


def sampler_items() -> list[dict]:
    """GET /sdapi/v1/samplers, in A1111's shape (name, aliases, options)."""
    return [{"name": s.name, "aliases": list(s.aliases),
             "options": {"scheduler": "karras"} if s.automatic_karras else {}} for s in SAMPLERS]


def schedule_items() -> list[dict]:
    """GET /sdapi/v1/schedulers, in A1111's shape."""
    return [{"name": name, "label": label, "aliases": None, "default_rho": 7.0 if name == "karras" else -1,
             "need_inner_model": False} for name, label in SCHEDULES]
