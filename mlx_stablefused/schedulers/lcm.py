"""Latent Consistency Model multistep sampling (Luo et al. 2023), as diffusers' LCMScheduler."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .array_ops import clip
from .base import NoiseSource, Scheduler, predicted_original


class LCMScheduler(Scheduler):
    name = "lcm"
    stochastic = True
    defaults = {"original_inference_steps": 50, "clip_sample": False, "clip_sample_range": 1.0,
                "set_alpha_to_one": True, "timestep_scaling": 10.0, "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear"}

    def __init__(self, config=None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self.final_alpha_cumprod = 1.0 if self.config["set_alpha_to_one"] else float(self.alphas_cumprod[0])

    def set_timesteps(self, num_inference_steps: int) -> None:
        n = self._check_steps(num_inference_steps)
        original = int(self.config["original_inference_steps"])
        if n > original:
            raise ValueError(f"LCM takes at most original_inference_steps={original} steps, got {n}")
        k = int(self.config["num_train_timesteps"]) // original
        origin = (np.arange(1, original + 1) * k - 1)[::-1]
        picks = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
        self.timesteps = origin[picks].astype(np.float64)
        self.num_inference_steps = n

    def _boundary_scalings(self, t: int) -> tuple[float, float]:
        sigma_data = 0.5
        scaled = t * float(self.config["timestep_scaling"])
        return sigma_data**2 / (scaled**2 + sigma_data**2), scaled / math.sqrt(scaled**2 + sigma_data**2)

    def step(self, model_output: Any, i: int, sample: Any, noise: NoiseSource | None = None) -> Any:
        t = int(self.timesteps[i])
        last = i == len(self.timesteps) - 1
        prev_t = t if last else int(self.timesteps[i + 1])
        a_t = float(self.alphas_cumprod[t])
        a_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else self.final_alpha_cumprod
        c_skip, c_out = self._boundary_scalings(t)
        x0 = predicted_original(self.prediction_type, model_output, sample, a_t)
        if self.config["clip_sample"]:
            r = float(self.config["clip_sample_range"])
            x0 = clip(x0, -r, r)
        denoised = x0 * c_out + sample * c_skip
        if last:
            return denoised
        if noise is None:
            raise ValueError("LCM needs a noise source")
        return denoised * math.sqrt(a_prev) + noise() * math.sqrt(1.0 - a_prev)
