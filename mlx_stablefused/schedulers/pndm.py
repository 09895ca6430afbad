"""PNDM / PLMS (Liu et al. 2022) as diffusers' PNDMScheduler, Runge-Kutta warm-up included."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .base import NoiseSource, Scheduler, spaced_timesteps


class PNDMScheduler(Scheduler):
    name = "pndm"
    defaults = {"skip_prk_steps": False, "set_alpha_to_one": False}
    prediction_types = ("epsilon", "v_prediction")

    def __init__(self, config=None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self.final_alpha_cumprod = 1.0 if self.config["set_alpha_to_one"] else float(self.alphas_cumprod[0])
        self._reset()

    def _reset(self) -> None:
        self.counter = 0
        self.ets: list[Any] = []
        self.cur_sample = None
        self.cur_model_output: Any = 0

    def set_timesteps(self, num_inference_steps: int) -> None:
        n = self._check_steps(num_inference_steps)
        self.num_inference_steps = n
        c = self.config
        base = spaced_timesteps(c, n, integer=True)[::-1]  # ascending, as diffusers builds it
        if c["skip_prk_steps"]:
            # PLMS only: the second timestep is repeated to seed the multistep history.
            self.prk_timesteps = np.zeros(0)
            plms = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1]
        else:
            if n < 4:
                raise ValueError(f"PNDM's Runge-Kutta warm-up needs at least 4 steps, got {n}; "
                                 "use more steps or set_scheduler('pndm', skip_prk_steps=True)")
            ratio = c["num_train_timesteps"] // n
            prk = np.array(base[-4:]).repeat(2) + np.tile(np.array([0, ratio // 2]), 4)
            self.prk_timesteps = prk[:-1].repeat(2)[1:-1][::-1].copy()
            plms = base[:-3][::-1].copy()
        self.plms_timesteps = plms
        self.timesteps = np.concatenate([self.prk_timesteps, plms]).astype(np.float64)
        self._reset()
        self._last_index = None

    def step(self, model_output: Any, i: int, sample: Any, noise: NoiseSource | None = None) -> Any:
        if self._is_fresh_start(i):
            self._reset()  # a new loop must not inherit the previous run's history
        t = int(self.timesteps[i])
        if self.counter < len(self.prk_timesteps) and not self.config["skip_prk_steps"]:
            return self._step_prk(model_output, t, sample)
        return self._step_plms(model_output, t, sample)

    def _ratio(self) -> int:
        return self.config["num_train_timesteps"] // self.num_inference_steps

    def _step_prk(self, model_output: Any, t: int, sample: Any) -> Any:
        diff = 0 if self.counter % 2 else self._ratio() // 2
        prev_t = t - diff
        t = int(self.prk_timesteps[self.counter // 4 * 4])
        phase = self.counter % 4
        if phase == 0:
            self.cur_model_output = self.cur_model_output + model_output * (1 / 6)
            self.ets.append(model_output)
            self.cur_sample = sample
        elif phase == 1:
            self.cur_model_output = self.cur_model_output + model_output * (1 / 3)
        elif phase == 2:
            self.cur_model_output = self.cur_model_output + model_output * (1 / 3)
        else:
            model_output = self.cur_model_output + model_output * (1 / 6)
            self.cur_model_output = 0
        cur_sample = self.cur_sample if self.cur_sample is not None else sample
        prev = self._prev_sample(cur_sample, t, prev_t, model_output)
        self.counter += 1
        return prev

    def _step_plms(self, model_output: Any, t: int, sample: Any) -> Any:
        prev_t = t - self._ratio()
        if self.counter != 1:
            self.ets = self.ets[-3:]
            self.ets.append(model_output)
        else:
            prev_t = t
            t = t + self._ratio()
        ets = self.ets
        if len(ets) == 1 and self.counter == 0:
            self.cur_sample = sample
        elif len(ets) == 1 and self.counter == 1:
            model_output = (model_output + ets[-1]) * 0.5
            sample = self.cur_sample
            self.cur_sample = None
        elif len(ets) == 2:
            model_output = (ets[-1] * 3 - ets[-2]) * 0.5
        elif len(ets) == 3:
            model_output = (ets[-1] * 23 - ets[-2] * 16 + ets[-3] * 5) * (1 / 12)
        else:
            model_output = (ets[-1] * 55 - ets[-2] * 59 + ets[-3] * 37 - ets[-4] * 9) * (1 / 24)
        prev = self._prev_sample(sample, t, prev_t, model_output)
        self.counter += 1
        return prev

    def _prev_sample(self, sample: Any, t: int, prev_t: int, model_output: Any) -> Any:
        a_t = float(self.alphas_cumprod[t])
        a_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else self.final_alpha_cumprod
        b_t, b_prev = 1.0 - a_t, 1.0 - a_prev
        if self.prediction_type == "v_prediction":
            model_output = model_output * math.sqrt(a_t) + sample * math.sqrt(b_t)
        sample_coeff = math.sqrt(a_prev / a_t)
        denom = a_t * math.sqrt(b_prev) + math.sqrt(a_t * b_t * a_prev)
        return sample * sample_coeff - model_output * ((a_prev - a_t) / denom)
