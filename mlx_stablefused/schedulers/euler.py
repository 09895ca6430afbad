"""Euler (Karras et al. 2022, Algorithm 2 without churn) as diffusers' EulerDiscreteScheduler."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .base import NoiseSource, Scheduler, spaced_timesteps


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep whose sigma is ``sigma`` (log-linear interpolation, as diffusers)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.clip(np.cumsum(dists >= 0, axis=0).argmax(axis=0), 0, log_sigmas.shape[0] - 2)
    high = low + 1
    w = (log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high])
    w = np.clip(w, 0, 1)
    return ((1 - w) * low + w * high).reshape(sigma.shape)


class SigmaScheduler(Scheduler):
    """Base for samplers that work on k-diffusion sigmas (x = x0 + sigma * eps)."""

    defaults = {
        "timestep_spacing": "linspace",
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "final_sigmas_type": "zero",
    }

    def __init__(self, config=None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self.train_sigmas = np.sqrt((1.0 - self.alphas_cumprod) / self.alphas_cumprod)
        self.sigmas = np.zeros(0)

    def _sigmas_and_timesteps(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        c = self.config
        timesteps = spaced_timesteps(c, n, integer=False)
        grid = np.arange(len(self.train_sigmas))
        if c["interpolation_type"] == "linear":
            sigmas = np.interp(timesteps, grid, self.train_sigmas)
        elif c["interpolation_type"] == "log_linear":
            sigmas = np.exp(np.linspace(np.log(self.train_sigmas[-1]), np.log(self.train_sigmas[0]), n + 1))
        else:
            raise ValueError(f"unknown interpolation_type {c['interpolation_type']!r}")
        if c["use_karras_sigmas"]:
            sigmas = karras_sigmas(float(sigmas[-1]), float(sigmas[0]), n)
            timesteps = sigma_to_t(sigmas, np.log(self.train_sigmas))
        if c["final_sigmas_type"] == "zero":
            last = 0.0
        elif c["final_sigmas_type"] == "sigma_min":
            last = float(self.train_sigmas[0])
        else:
            raise ValueError(f"unknown final_sigmas_type {c['final_sigmas_type']!r}")
        return np.concatenate([sigmas, [last]]), timesteps

    def set_timesteps(self, num_inference_steps: int) -> None:
        n = self._check_steps(num_inference_steps)
        self.num_inference_steps = n
        self.sigmas, self.timesteps = self._sigmas_and_timesteps(n)
        sigma_max = float(self.sigmas.max())
        if self.config["timestep_spacing"] in ("linspace", "trailing"):
            self.init_noise_sigma = sigma_max
        else:
            self.init_noise_sigma = math.sqrt(sigma_max**2 + 1)

    def scale_model_input(self, sample: Any, i: int) -> Any:
        return sample * (1.0 / math.sqrt(float(self.sigmas[i]) ** 2 + 1.0))

    def denoised(self, model_output: Any, sample: Any, sigma: float) -> Any:
        """x0 predicted from the model output at noise level ``sigma`` (sample = x0 + sigma * eps)."""
        kind = self.prediction_type
        if kind == "epsilon":
            return sample - model_output * sigma
        if kind == "v_prediction":
            return model_output * (-sigma / math.sqrt(sigma**2 + 1)) + sample * (1.0 / (sigma**2 + 1))
        return model_output

    def add_noise(self, original: Any, noise: Any, i: int) -> Any:
        return original + noise * float(self.sigmas[i])


class EulerScheduler(SigmaScheduler):
    name = "euler"

    def step(self, model_output: Any, i: int, sample: Any, noise: NoiseSource | None = None) -> Any:
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        x0 = self.denoised(model_output, sample, sigma)
        derivative = (sample - x0) / sigma
        return sample + derivative * (sigma_next - sigma)
