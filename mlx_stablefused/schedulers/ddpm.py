"""DDPM ancestral sampling (Ho et al. 2020) as diffusers' DDPMScheduler."""

from __future__ import annotations

import math
from typing import Any

from .array_ops import clip
from .base import NoiseSource, Scheduler, predicted_original, spaced_timesteps

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")


class DDPMScheduler(Scheduler):
    name = "ddpm"
    stochastic = True
    defaults = {"clip_sample": True, "clip_sample_range": 1.0, "variance_type": "fixed_small"}

    def _validate_config(self) -> None:
        super()._validate_config()
        if self.config["variance_type"] not in VARIANCE_TYPES:
            raise ValueError(f"DDPM variance_type {self.config['variance_type']!r} is not supported "
                             f"(supported: {VARIANCE_TYPES}; learned variances need a model that predicts them)")

    def set_timesteps(self, num_inference_steps: int) -> None:
        n = self._check_steps(num_inference_steps)
        self.num_inference_steps = n
        self.timesteps = spaced_timesteps(self.config, n, integer=True)

    def step(self, model_output: Any, i: int, sample: Any, noise: NoiseSource | None = None) -> Any:
        t = int(self.timesteps[i])
        prev_t = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1
        a_t = float(self.alphas_cumprod[t])
        a_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else 1.0
        b_t, b_prev = 1.0 - a_t, 1.0 - a_prev
        current_alpha = a_t / a_prev
        current_beta = 1.0 - current_alpha
        x0 = predicted_original(self.prediction_type, model_output, sample, a_t)
        if self.config["clip_sample"]:
            r = float(self.config["clip_sample_range"])
            x0 = clip(x0, -r, r)
        prev = x0 * (math.sqrt(a_prev) * current_beta / b_t) + sample * (math.sqrt(current_alpha) * b_prev / b_t)
        if t > 0:
            if noise is None:
                raise ValueError("DDPM needs a noise source")
            kind = self.config["variance_type"]
            small = max(b_prev / b_t * current_beta, 1e-20)
            if kind == "fixed_small":
                std = math.sqrt(small)
            elif kind == "fixed_small_log":
                std = math.exp(0.5 * math.log(small))
            else:
                std = math.sqrt(current_beta)
            prev = prev + noise() * std
        return prev

