"""Samplers on k-diffusion sigmas (x = x0 + sigma * eps): Euler, Euler ancestral, linear multistep.

Each mirrors its diffusers class (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler,
LMSDiscreteScheduler): the same sigma tables, model-input scaling and update.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .array_ops import clip
from .base import NoiseSource, Scheduler, spaced_timesteps
from .sigmas import ancestral_split, karras_sigmas, sigma_to_t


class SigmaScheduler(Scheduler):
    """Base for samplers that step on sigmas. ``sigmas[i]`` is the noise level at ``timesteps[i]``."""

    defaults = {
        "timestep_spacing": "linspace",
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "final_sigmas_type": "zero",
    }
    round_karras_timesteps = False

    def __init__(self, config=None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self.train_sigmas = np.sqrt((1.0 - self.alphas_cumprod) / self.alphas_cumprod)
        self.log_train_sigmas = np.log(self.train_sigmas)
        self.sigmas = np.zeros(0)

    def source_schedule(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(sigmas, timesteps) of the ``n`` model evaluations before any final sigma is appended."""
        c = self.config
        timesteps = spaced_timesteps(c, n, integer=False)
        grid = np.arange(len(self.train_sigmas))
        if c["interpolation_type"] == "linear":
            sigmas = np.interp(timesteps, grid, self.train_sigmas)
        elif c["interpolation_type"] == "log_linear":
            sigmas = np.exp(np.linspace(self.log_train_sigmas[-1], self.log_train_sigmas[0], n + 1))
        else:
            raise ValueError(f"unknown interpolation_type {c['interpolation_type']!r}")
        if c["use_karras_sigmas"]:
            sigmas = karras_sigmas(float(sigmas[-1]), float(sigmas[0]), n)
            timesteps = sigma_to_t(sigmas, self.log_train_sigmas)
            if self.round_karras_timesteps:
                timesteps = timesteps.round()
        return sigmas, timesteps

    def final_sigma(self) -> float:
        kind = self.config["final_sigmas_type"]
        if kind == "zero":
            return 0.0
        if kind == "sigma_min":
            return float(self.train_sigmas[0])
        raise ValueError(f"unknown final_sigmas_type {kind!r}")

    def set_timesteps(self, num_inference_steps: int) -> None:
        n = self._check_steps(num_inference_steps)
        self.num_inference_steps = n
        sigmas, self.timesteps = self.source_schedule(n)
        self.sigmas = np.concatenate([sigmas, [self.final_sigma()]])
        self._set_init_noise_sigma(float(self.sigmas.max()))
        self._last_index = None

    def _set_init_noise_sigma(self, sigma_max: float) -> None:
        if self.config["timestep_spacing"] in ("linspace", "trailing"):
            self.init_noise_sigma = sigma_max
        else:
            self.init_noise_sigma = math.sqrt(sigma_max**2 + 1)

    def input_sigma(self, i: int) -> float:
        """Noise level of the sample the model sees at step ``i``."""
        return float(self.sigmas[i])

    def scale_model_input(self, sample: Any, i: int) -> Any:
        return sample * (1.0 / math.sqrt(self.input_sigma(i) ** 2 + 1.0))

    def denoised(self, model_output: Any, sample: Any, sigma: float) -> Any:
        """x0 predicted from the model output at noise level ``sigma`` (sample = x0 + sigma * eps)."""
        kind = self.prediction_type
        if kind == "epsilon":
            x0 = sample - model_output * sigma
        elif kind == "v_prediction":
            x0 = model_output * (-sigma / math.sqrt(sigma**2 + 1)) + sample * (1.0 / (sigma**2 + 1))
        else:
            x0 = model_output
        if self.config.get("clip_sample"):
            r = float(self.config["clip_sample_range"])
            x0 = clip(x0, -r, r)
        return x0

    def add_noise(self, original: Any, noise: Any, i: int) -> Any:
        return original + noise * self.input_sigma(i)


class EulerScheduler(SigmaScheduler):
    name = "euler"

    def step(self, model_output: Any, i: int, sample: Any, noise: NoiseSource | None = None) -> Any:
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        derivative = (sample - self.denoised(model_output, sample, sigma)) / sigma
        return sample + derivative * (sigma_next - sigma)


class EulerAncestralScheduler(SigmaScheduler):
    """Euler with fresh noise at every step (k-diffusion's sample_euler_ancestral)."""

    name = "euler_ancestral"
    stochastic = True
    prediction_types = ("epsilon", "v_prediction")

    def source_schedule(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        timesteps = spaced_timesteps(self.config, n, integer=False)
        return np.interp(timesteps, np.arange(len(self.train_sigmas)), self.train_sigmas), timesteps

    def final_sigma(self) -> float:
        return 0.0

    def step(self, model_output: Any, i: int, sample: Any, noise: NoiseSource | None = None) -> Any:
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        down, up = ancestral_split(sigma, sigma_next)
        derivative = (sample - self.denoised(model_output, sample, sigma)) / sigma
        prev = sample + derivative * (down - sigma)
        if up > 0:
            if noise is None:
                raise ValueError(f"{type(self).__name__} needs a noise source")
            prev = prev + noise() * up
        return prev


def lms_coefficient(sigmas: np.ndarray, order: int, i: int, j: int) -> float:
    """Integral over [sigma_i, sigma_i+1] of the Lagrange basis polynomial of node i-j (exact)."""
    poly = np.polynomial.Polynomial([1.0])
    for k in range(order):
        if k == j:
            continue
        poly = poly * np.polynomial.Polynomial([-sigmas[i - k], 1.0]) / (sigmas[i - j] - sigmas[i - k])
    antiderivative = poly.integ()
    return float(antiderivative(sigmas[i + 1]) - antiderivative(sigmas[i]))


class LMSScheduler(SigmaScheduler):
    """Linear multistep on sigmas (k-diffusion's sample_lms), order 4 by default."""

    name = "linear_multistep"
    defaults = {**SigmaScheduler.defaults, "lms_order": 4}

    def source_schedule(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        timesteps = spaced_timesteps(self.config, n, integer=False)
        sigmas = np.interp(timesteps, np.arange(len(self.train_sigmas)), self.train_sigmas)
        if self.config["use_karras_sigmas"]:
            sigmas = karras_sigmas(float(sigmas[-1]), float(sigmas[0]), n)
            timesteps = sigma_to_t(sigmas, self.log_train_sigmas)
        return sigmas, timesteps

    def final_sigma(self) -> float:
        return 0.0

    def step(self, model_output: Any, i: int, sample: Any, noise: NoiseSource | None = None) -> Any:
        if self._is_fresh_start(i):
            self.derivatives: list[Any] = []
        sigma = float(self.sigmas[i])
        self.derivatives.append((sample - self.denoised(model_output, sample, sigma)) / sigma)
        max_order = int(self.config["lms_order"])
        self.derivatives = self.derivatives[-max_order:]
        order = min(i + 1, max_order, len(self.derivatives))
        prev = sample
        for j, derivative in enumerate(reversed(self.derivatives[-order:])):
            prev = prev + derivative * lms_coefficient(self.sigmas, order, i, j)
        return prev
