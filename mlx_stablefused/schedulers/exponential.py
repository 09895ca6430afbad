"""Shared tables and conversions for the exponential-integrator samplers: DPM-Solver (multistep and
singlestep), DEIS and UniPC. They work in VP form: the model input is the latent itself
(no input scaling), and each step is exact for the linear part of the diffusion ODE in
lambda = log(alpha_t / sigma_t) = -log(sigma), where sigma is the k-diffusion noise level.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .base import Scheduler
from .sigmas import alpha_sigma, karras_sigmas, sigma_to_t


class ExponentialIntegratorScheduler(Scheduler):
    defaults = {
        "timestep_spacing": "linspace",
        "use_karras_sigmas": False,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -math.inf,
        "solver_order": 2,
        "lower_order_final": True,
        "thresholding": False,
    }
    round_karras_timesteps = True
    max_order = 3

    def _validate_config(self) -> None:
        super()._validate_config()
        c = self.config
        if c.get("thresholding"):
            raise ValueError(f"{type(self).__name__}: dynamic thresholding is not supported")
        if not 1 <= int(c["solver_order"]) <= self.max_order:
            raise ValueError(f"solver_order must be between 1 and {self.max_order}, got {c['solver_order']}")
        if c.get("final_sigmas_type", "zero") not in ("zero", "sigma_min"):
            raise ValueError(f"unknown final_sigmas_type {c['final_sigmas_type']!r}")

    def __init__(self, config=None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self.train_sigmas = np.sqrt((1.0 - self.alphas_cumprod) / self.alphas_cumprod)
        self.log_train_sigmas = np.log(self.train_sigmas)
        self.sigmas = np.zeros(0)

    def base_timesteps(self, n: int) -> np.ndarray:
        c = self.config
        total = int(c["num_train_timesteps"])
        lambdas = np.log(np.sqrt(self.alphas_cumprod)) - np.log(np.sqrt(1.0 - self.alphas_cumprod))
        clipped = int(np.searchsorted(lambdas[::-1], float(c["lambda_min_clipped"])))
        last = total - clipped
        spacing = c["timestep_spacing"]
        if spacing == "linspace":
            return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy()
        if spacing == "leading":
            ratio = last // (n + 1)
            return (np.arange(0, n + 1) * ratio).round()[::-1][:-1] + int(c["steps_offset"])
        ratio = total / n
        return np.arange(last, 0, -ratio).round() - 1

    def final_sigma(self) -> float:
        return 0.0 if self.config.get("final_sigmas_type", "zero") == "zero" else float(self.train_sigmas[0])

    def set_timesteps(self, num_inference_steps: int) -> None:
        n = self._check_steps(num_inference_steps)
        if self.config["use_karras_sigmas"]:
            sigmas = karras_sigmas(float(self.train_sigmas[0]), float(self.train_sigmas[-1]), n)
            timesteps = sigma_to_t(sigmas, self.log_train_sigmas)
            if self.round_karras_timesteps and self.config["beta_schedule"] != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        else:
            timesteps = self.base_timesteps(n)
            sigmas = np.interp(timesteps, np.arange(len(self.train_sigmas)), self.train_sigmas)
        # diffusers stores these timesteps as int64, truncating any fraction left unrounded.
        self.timesteps = np.floor(timesteps + 1e-9).astype(np.float64)
        self.sigmas = np.concatenate([sigmas, [self.final_sigma()]])
        self.num_inference_steps = len(timesteps)
        self._last_index = None
        self.reset_state()

    def reset_state(self) -> None:
        self.model_outputs: list[Any] = [None] * int(self.config["solver_order"])
        self.lower_order_nums = 0

    def remember(self, converted: Any) -> None:
        self.model_outputs = self.model_outputs[1:] + [converted]

    def sigma(self, i: int) -> float:
        return float(self.sigmas[i])

    def data_prediction(self, model_output: Any, sample: Any, i: int) -> Any:
        """x0 from the model output at step ``i``."""
        alpha_t, sigma_t = alpha_sigma(self.sigma(i))
        kind = self.prediction_type
        if kind == "epsilon":
            return (sample - model_output * sigma_t) * (1.0 / alpha_t)
        if kind == "v_prediction":
            return sample * alpha_t - model_output * sigma_t
        return model_output

    def noise_prediction(self, model_output: Any, sample: Any, i: int) -> Any:
        """epsilon from the model output at step ``i``."""
        alpha_t, sigma_t = alpha_sigma(self.sigma(i))
        kind = self.prediction_type
        if kind == "epsilon":
            return model_output
        if kind == "v_prediction":
            return model_output * alpha_t + sample * sigma_t
        return (sample - model_output * alpha_t) * (1.0 / sigma_t)

    def add_noise(self, original: Any, noise: Any, i: int) -> Any:
        alpha_t, sigma_t = alpha_sigma(self.sigma(i))
        return original * alpha_t + noise * sigma_t
