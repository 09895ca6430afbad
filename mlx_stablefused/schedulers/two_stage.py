"""Two-evaluation samplers: Heun, DPM2 (KDPM2), DPM2 ancestral, and DPM-Solver SDE.

Each step k from sigma_k to sigma_k+1 evaluates the model twice: first at sigma_k (a
first-order move to an intermediate point), then at that point (the correction). The
timestep table interleaves the two, as in diffusers: index 2k is the first evaluation of
step k, index 2k+1 its second; the last step, ending at sigma 0, has only the first.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .base import NoiseSource
from .brownian import brownian_noise
from .euler import SigmaScheduler
from .sigmas import ancestral_split, sigma_to_t


class TwoStageScheduler(SigmaScheduler):
    defaults = {**SigmaScheduler.defaults}
    order = 2

    def set_timesteps(self, num_inference_steps: int) -> None:
        n = self._check_steps(num_inference_steps)
        self.num_inference_steps = n
        sigmas, t = self.source_schedule(n)
        self.step_sigmas = np.concatenate([sigmas, [0.0]])  # sigma_0 ... sigma_n-1, 0
        self.mid_sigmas = self.midpoints()  # where step k's second evaluation happens (n - 1 values)
        mid_t = sigma_to_t(self.mid_sigmas, self.log_train_sigmas) if n > 1 else np.zeros(0)
        table = np.empty(2 * n - 1)
        table[0::2] = t
        table[1::2] = self.mid_timesteps(t, mid_t)
        self.timesteps = table
        self._set_init_noise_sigma(float(self.step_sigmas.max()))
        self._state: dict[str, Any] = {}
        self._last_index = None

    def midpoints(self) -> np.ndarray:
        raise NotImplementedError

    def mid_timesteps(self, t: np.ndarray, mid_t: np.ndarray) -> np.ndarray:
        return mid_t

    def input_sigma(self, i: int) -> float:
        k, second = divmod(i, 2)
        return float(self.mid_sigmas[k] if second else self.step_sigmas[k])

    def add_noise(self, original: Any, noise: Any, i: int) -> Any:
        # As diffusers' doubled sigma table [s0, s1, s1, s2, s2, ...]: index 2k -> s_k, 2k+1 -> s_k+1.
        return original + noise * float(self.step_sigmas[(i + 1) // 2])

    def step(self, model_output: Any, i: int, sample: Any, noise: NoiseSource | None = None) -> Any:
        k, second = divmod(i, 2)
        if self._is_fresh_start(i):
            self._state = {}
            if second:
                raise ValueError(f"{type(self).__name__} cannot start at a second-stage index ({i}); "
                                 "start at an even index")
        sigma, sigma_next = float(self.step_sigmas[k]), float(self.step_sigmas[k + 1])
        x0 = self.denoised(model_output, sample, self.input_sigma(i))
        if second:
            return self.second_stage(x0, sample, sigma, sigma_next, k, noise)
        return self.first_stage(x0, sample, sigma, sigma_next, k, noise)

    def first_stage(self, x0, sample, sigma, sigma_next, k, noise):
        raise NotImplementedError

    def second_stage(self, x0, sample, sigma, sigma_next, k, noise):
        raise NotImplementedError

    @staticmethod
    def _require(noise: NoiseSource | None, name: str) -> NoiseSource:
        if noise is None:
            raise ValueError(f"{name} needs a noise source")
        return noise


class HeunScheduler(TwoStageScheduler):
    """Heun's method (Karras et al. 2022, Algorithm 1 without churn), as HeunDiscreteScheduler."""

    name = "heun"
    defaults = {**SigmaScheduler.defaults, "clip_sample": False, "clip_sample_range": 1.0}

    def midpoints(self) -> np.ndarray:
        return self.step_sigmas[1:-1]  # the correction is evaluated at the next sigma

    def mid_timesteps(self, t: np.ndarray, mid_t: np.ndarray) -> np.ndarray:
        return t[1:]

    def first_stage(self, x0, sample, sigma, sigma_next, k, noise):
        derivative = (sample - x0) / sigma
        self._state = {"derivative": derivative, "dt": sigma_next - sigma, "sample": sample}
        return sample + derivative * (sigma_next - sigma)

    def second_stage(self, x0, sample, sigma, sigma_next, k, noise):
        s = self._state
        derivative = (s["derivative"] + (sample - x0) / sigma_next) * 0.5
        return s["sample"] + derivative * s["dt"]


class KDPM2Scheduler(TwoStageScheduler):
    """DPM-Solver-2 in k-diffusion's form (sample_dpm_2), as KDPM2DiscreteScheduler."""

    name = "dpm2"
    round_karras_timesteps = True
    prediction_types = ("epsilon", "v_prediction")

    def midpoints(self) -> np.ndarray:
        s = self.step_sigmas
        return np.sqrt(s[:-2] * s[1:-1])  # geometric mean of sigma_k and sigma_k+1

    def first_stage(self, x0, sample, sigma, sigma_next, k, noise):
        target = float(self.mid_sigmas[k]) if sigma_next > 0 else 0.0
        self._state = {"sample": sample}
        return sample + (sample - x0) * ((target - sigma) / sigma)

    def second_stage(self, x0, sample, sigma, sigma_next, k, noise):
        mid = float(self.mid_sigmas[k])
        return self._state["sample"] + (sample - x0) * ((sigma_next - sigma) / mid)


class KDPM2AncestralScheduler(TwoStageScheduler):
    """DPM-Solver-2 with ancestral noise (sample_dpm_2_ancestral), as KDPM2AncestralDiscreteScheduler."""

    name = "dpm2_ancestral"
    stochastic = True
    round_karras_timesteps = True
    prediction_types = ("epsilon", "v_prediction")

    def midpoints(self) -> np.ndarray:
        s = self.step_sigmas
        downs = np.array([ancestral_split(s[k], s[k + 1])[0] for k in range(len(s) - 2)])
        return np.sqrt(s[:-2] * downs)  # geometric mean of sigma_k and the ancestral target

    def first_stage(self, x0, sample, sigma, sigma_next, k, noise):
        target = float(self.mid_sigmas[k]) if sigma_next > 0 else 0.0
        self._state = {"sample": sample}
        return sample + (sample - x0) * ((target - sigma) / sigma)

    def second_stage(self, x0, sample, sigma, sigma_next, k, noise):
        down, up = ancestral_split(sigma, sigma_next)
        mid = float(self.mid_sigmas[k])
        prev = self._state["sample"] + (sample - x0) * ((down - sigma) / mid)
        return prev + self._require(noise, self.name)() * up


class DPMSolverSDEScheduler(TwoStageScheduler):
    """DPM-Solver++(2S)-SDE as DPMSolverSDEScheduler. Both moves of a step start at sigma_k (to the
    midpoint, then to sigma_k+1) and take their noise from one Brownian path over sigma, as diffusers'
    torchsde tree: ``schedulers.brownian``, seeded from the pipeline's generator (no torchsde needed)."""

    name = "dpm_sde"
    stochastic = True
    defaults = {**SigmaScheduler.defaults, "s_noise": 1.0}
    prediction_types = ("epsilon", "v_prediction")

    def midpoints(self) -> np.ndarray:
        s = self.step_sigmas
        return np.sqrt(s[:-2] * s[1:-1])  # exp of the midpoint in t = -log(sigma)

    def step(self, model_output: Any, i: int, sample: Any, noise: NoiseSource | None = None) -> Any:
        if self._last_index is None or i != self._last_index + 1:
            self._path = None  # a new run: a new path, drawn when its first noise is needed
        return super().step(model_output, i, sample, noise)

    def _ancestral_move(self, start, x0, sigma_from, sigma_to, noise):
        up = min(sigma_to, math.sqrt(max(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2, 0.0)))
        down = math.sqrt(max(sigma_to**2 - up**2, 0.0))
        ratio = down / sigma_from
        prev = start * ratio - x0 * (ratio - 1.0)
        if self._path is None:
            positive = self.step_sigmas[self.step_sigmas > 0]
            self._path = brownian_noise(self._require(noise, self.name), float(positive.min()),
                                        float(positive.max()), self.name)
        return prev + self._path(sigma_from, sigma_to) * (up * float(self.config["s_noise"]))

    def first_stage(self, x0, sample, sigma, sigma_next, k, noise):
        if sigma_next == 0:
            return sample + (sample - x0) * ((sigma_next - sigma) / sigma)
        self._state = {"sample": sample}
        return self._ancestral_move(sample, x0, sigma, float(self.mid_sigmas[k]), noise)

    def second_stage(self, x0, sample, sigma, sigma_next, k, noise):
        return self._ancestral_move(self._state["sample"], x0, sigma, sigma_next, noise)
