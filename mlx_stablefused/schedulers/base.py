"""Shared machinery for the samplers: noise schedules, timestep spacing, configuration.

Tables are computed in numpy float64 (more exact than diffusers' float32 tables; the
difference is below 1e-6 relative). Per-step coefficients become Python floats, so the
step arithmetic runs unchanged on numpy, MLX or torch arrays.

Configuration follows diffusers' ``from_config``: a key read from the model's
``scheduler_config.json`` overrides this sampler's own default, a missing key keeps
that default (so, as in diffusers, Euler on an SD 1.5 config spaces its timesteps by
``linspace`` while DDIM uses ``leading``), and keyword overrides win over both.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import numpy as np

NoiseSource = Callable[[], Any]
"""Returns a standard-normal array shaped like the sample, in the sample's layout and backend."""

COMMON_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "linspace", "trailing")


def make_betas(config: Mapping[str, Any]) -> np.ndarray:
    n = int(config["num_train_timesteps"])
    if config.get("trained_betas") is not None:
        betas = np.asarray(config["trained_betas"], dtype=np.float64)
        if betas.shape != (n,):
            raise ValueError(f"trained_betas has {betas.size} entries, expected num_train_timesteps={n}")
        return betas
    schedule = config["beta_schedule"]
    start, end = float(config["beta_start"]), float(config["beta_end"])
    if schedule == "linear":
        return np.linspace(start, end, n, dtype=np.float64)
    if schedule == "scaled_linear":
        return np.linspace(start**0.5, end**0.5, n, dtype=np.float64) ** 2
    if schedule == "squaredcos_cap_v2":
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)])
    raise ValueError(f"unknown beta_schedule {schedule!r}; expected one of {BETA_SCHEDULES}")


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift the schedule so the last step has zero SNR (arXiv 2305.08891, Algorithm 1)."""
    sqrt_acp = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_acp[0], sqrt_acp[-1]
    sqrt_acp = (sqrt_acp - last) * first / (first - last)
    acp = sqrt_acp**2
    alphas = np.concatenate([acp[:1], acp[1:] / acp[:-1]])
    return 1.0 - alphas


def spaced_timesteps(config: Mapping[str, Any], num_inference_steps: int, *, integer: bool) -> np.ndarray:
    """Descending training-time indices for ``num_inference_steps`` steps, as diffusers spaces them.

    ``integer=False`` keeps linspace's fractional values, as the sigma-based samplers do.
    """
    total = int(config["num_train_timesteps"])
    n = int(num_inference_steps)
    spacing = config["timestep_spacing"]
    if spacing == "linspace":
        t = np.linspace(0, total - 1, n, dtype=np.float64)[::-1]
        return t.round() if integer else t.copy()
    if spacing == "leading":
        ratio = total // n
        return (np.arange(0, n) * ratio).round()[::-1].astype(np.float64) + int(config["steps_offset"])
    if spacing == "trailing":
        ratio = total / n
        return np.round(np.arange(total, 0, -ratio)).astype(np.float64) - 1
    raise ValueError(f"unknown timestep_spacing {spacing!r}; expected one of {SPACINGS}")


class Scheduler:
    """Base sampler. Loops call, for each index ``i`` of ``timesteps``:

    ``x_in = scale_model_input(x, i)``; ``eps = unet(x_in, timesteps[i])``;
    ``x = step(eps, i, x, noise)``.

    Passing the index rather than the timestep value keeps multi-evaluation samplers
    (whose tables repeat timesteps) and partial schedules (image-to-image) unambiguous.
    """

    name: str = ""
    defaults: dict[str, Any] = {}
    stochastic: bool = False
    order: int = 1

    def __init__(self, config: Mapping[str, Any] | None = None, **overrides: Any) -> None:
        allowed = {**COMMON_DEFAULTS, **self.defaults}
        unknown = sorted(k for k in overrides if k not in allowed)
        if unknown:
            raise TypeError(f"{type(self).__name__} got unknown option(s) {unknown}; it accepts {sorted(allowed)}")
        merged = dict(allowed)
        merged.update({k: v for k, v in (config or {}).items() if k in allowed})
        merged.update(overrides)
        self.config = merged
        self._validate_config()
        betas = make_betas(merged)
        if merged["rescale_betas_zero_snr"]:
            betas = rescale_zero_terminal_snr(betas)
        self.betas = betas
        self.alphas_cumprod = np.cumprod(1.0 - betas)
        self.timesteps = np.zeros(0)
        self.num_inference_steps = 0
        self.init_noise_sigma = 1.0
        self._last_index: int | None = None

    def _validate_config(self) -> None:
        c = self.config
        if c["prediction_type"] not in self.prediction_types:
            raise ValueError(f"{type(self).__name__} does not support prediction_type={c['prediction_type']!r}; "
                             f"expected one of {self.prediction_types}")
        if c["timestep_spacing"] not in SPACINGS:
            raise ValueError(f"unknown timestep_spacing {c['timestep_spacing']!r}; expected one of {SPACINGS}")
        if c["trained_betas"] is None and c["beta_schedule"] not in BETA_SCHEDULES:
            raise ValueError(f"unknown beta_schedule {c['beta_schedule']!r}; expected one of {BETA_SCHEDULES}")

    prediction_types: tuple[str, ...] = ("epsilon", "v_prediction", "sample")

    @property
    def prediction_type(self) -> str:
        return self.config["prediction_type"]

    def _check_steps(self, num_inference_steps: int) -> int:
        n = int(num_inference_steps)
        total = self.config["num_train_timesteps"]
        if n != num_inference_steps or n < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        if n > total:
            raise ValueError(f"num_inference_steps={n} exceeds the model's num_train_timesteps={total}")
        return n

    def set_timesteps(self, num_inference_steps: int) -> None:
        raise NotImplementedError

    def _is_fresh_start(self, i: int) -> bool:
        """True when step ``i`` does not continue the previous call's step: multistep history must reset.

        Lets one sampler object serve repeated runs and partial schedules (image-to-image starts
        mid-table) without an explicit reset call.
        """
        fresh = self._last_index is None or i != self._last_index + 1
        self._last_index = i
        return fresh

    def scale_model_input(self, sample: Any, i: int) -> Any:
        return sample

    def step(self, model_output: Any, i: int, sample: Any, noise: NoiseSource | None = None) -> Any:
        raise NotImplementedError

    def add_noise(self, original: Any, noise: Any, i: int) -> Any:
        """Noise a clean latent to the level of step ``i`` (the forward process)."""
        t = self.timesteps[i]
        acp = float(np.interp(t, np.arange(len(self.alphas_cumprod)), self.alphas_cumprod))
        return original * math.sqrt(acp) + noise * math.sqrt(1.0 - acp)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


def predicted_original(prediction_type: str, model_output: Any, sample: Any, alpha_prod: float) -> Any:
    """x0 from the model output at a DDPM time with cumulative alpha ``alpha_prod``."""
    a, b = math.sqrt(alpha_prod), math.sqrt(1.0 - alpha_prod)
    if prediction_type == "epsilon":
        return (sample - model_output * b) / a
    if prediction_type == "v_prediction":
        return sample * a - model_output * b
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"unknown prediction_type {prediction_type!r}")
