"""DDIM (Song et al. 2020), deterministic at eta=0, as diffusers' DDIMScheduler."""

from __future__ import annotations

import math
from typing import Any

from .array_ops import clip
from .base import NoiseSource, Scheduler, predicted_original, spaced_timesteps


class DDIMScheduler(Scheduler):
    name = "ddim"
    defaults = {
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "eta": 0.0,
    }

    def __init__(self, config=None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self.stochastic = self.config["eta"] > 0
        self.final_alpha_cumprod = 1.0 if self.config["set_alpha_to_one"] else float(self.alphas_cumprod[0])

    def set_timesteps(self, num_inference_steps: int) -> None:
        n = self._check_steps(num_inference_steps)
        self.num_inference_steps = n
        self.timesteps = spaced_timesteps(self.config, n, integer=True)

    def _alpha_prod(self, t: int) -> float:
        return float(self.alphas_cumprod[t]) if t >= 0 else self.final_alpha_cumprod

    def step(self, model_output: Any, i: int, sample: Any, noise: NoiseSource | None = None) -> Any:
        t = int(self.timesteps[i])
        # diffusers steps back by T // n whatever the spacing; mirroring it keeps parity.
        prev_t = t - self.config["num_train_timesteps"] // self.num_inference_steps
        a_t, a_prev = self._alpha_prod(t), self._alpha_prod(prev_t)
        b_t = 1.0 - a_t
        kind = self.prediction_type
        x0 = predicted_original(kind, model_output, sample, a_t)
        if kind == "epsilon":
            eps = model_output
        elif kind == "v_prediction":
            eps = model_output * math.sqrt(a_t) + sample * math.sqrt(b_t)
        else:
            eps = (sample - x0 * math.sqrt(a_t)) / math.sqrt(b_t)
        if self.config["clip_sample"]:
            r = float(self.config["clip_sample_range"])
            x0 = clip(x0, -r, r)
        eta = float(self.config["eta"])
        variance = (1.0 - a_prev) / b_t * (1.0 - a_t / a_prev)
        std = eta * math.sqrt(max(variance, 0.0))
        prev = x0 * math.sqrt(a_prev) + eps * math.sqrt(max(1.0 - a_prev - std**2, 0.0))
        if eta > 0:
            if noise is None:
                raise ValueError("DDIM with eta > 0 needs a noise source")
            prev = prev + noise() * std
        return prev
