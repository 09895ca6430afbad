"""DPM-Solver and DPM-Solver++ (Lu et al. 2022), multistep and singlestep, as diffusers'
DPMSolverMultistepScheduler and DPMSolverSinglestepScheduler.

Coefficients are Python floats from the k-diffusion sigmas: with r = sigma_t / sigma_s,
exp(-h) = r, so the step to sigma 0 (h infinite) is computed exactly as a limit, not as inf * 0.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .base import NoiseSource
from .exponential import ExponentialIntegratorScheduler
from .sigmas import alpha_sigma

ALGORITHMS = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver")


def _h(sig_s: float, sig_t: float) -> float:
    return math.inf if sig_t == 0 else math.log(sig_s / sig_t)


class DPMSolverBase(ExponentialIntegratorScheduler):
    algorithms = ALGORITHMS

    def _validate_config(self) -> None:
        super()._validate_config()
        c = self.config
        if c["algorithm_type"] not in self.algorithms:
            raise ValueError(f"unknown algorithm_type {c['algorithm_type']!r}; expected one of {self.algorithms}")
        if c["solver_type"] not in ("midpoint", "heun"):
            raise ValueError(f"unknown solver_type {c['solver_type']!r}; expected 'midpoint' or 'heun'")

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self.config["algorithm_type"].startswith("sde")

    @property
    def predicts_data(self) -> bool:
        return self.config["algorithm_type"].endswith("++")

    def convert(self, model_output: Any, sample: Any, i: int) -> Any:
        if self.predicts_data:
            return self.data_prediction(model_output, sample, i)
        return self.noise_prediction(model_output, sample, i)

    def first_order(self, m0: Any, sample: Any, sig_s: float, sig_t: float, noise: NoiseSource | None) -> Any:
        a_t, s_t = alpha_sigma(sig_t)
        a_s, s_s = alpha_sigma(sig_s)
        r = sig_t / sig_s  # exp(-h)
        kind = self.config["algorithm_type"]
        if kind == "dpmsolver++":
            return sample * (s_t / s_s) + m0 * (a_t * (1.0 - r))
        if kind == "dpmsolver":
            return sample * (a_t / a_s) - m0 * (a_t * (sig_s - sig_t))  # sigma_t * (e^h - 1)
        z = self._noise(noise)
        if kind == "sde-dpmsolver++":
            return sample * (s_t / s_s * r) + m0 * (a_t * (1.0 - r * r)) + z * (s_t * math.sqrt(1.0 - r * r))
        return (sample * (a_t / a_s) - m0 * (2.0 * a_t * (sig_s - sig_t))
                + z * (a_t * math.sqrt(max(sig_s**2 - sig_t**2, 0.0))))

    def _noise(self, noise: NoiseSource | None) -> Any:
        if noise is None:
            raise ValueError(f"{self.config['algorithm_type']} needs a noise source")
        return noise()

    def second_order_terms(self, sample, d0, d1, sig_from, sig_t, noise):
        """x_t from D0 (value) and D1 (first difference) over one interval ending at ``sig_t``."""
        a_t, s_t = alpha_sigma(sig_t)
        a_f, s_f = alpha_sigma(sig_from)
        h = _h(sig_from, sig_t)
        r = math.exp(-h)
        kind, solver = self.config["algorithm_type"], self.config["solver_type"]
        if kind == "dpmsolver++":
            phi = a_t * (r - 1.0)
            if solver == "midpoint":
                return sample * (s_t / s_f) - d0 * phi - d1 * (0.5 * phi)
            return sample * (s_t / s_f) - d0 * phi + d1 * (a_t * ((r - 1.0) / h + 1.0))
        if kind == "dpmsolver":
            phi = s_t * math.expm1(h)
            if solver == "midpoint":
                return sample * (a_t / a_f) - d0 * phi - d1 * (0.5 * phi)
            return sample * (a_t / a_f) - d0 * phi - d1 * (s_t * (math.expm1(h) / h - 1.0))
        z = self._noise(noise)
        if kind == "sde-dpmsolver++":
            phi = a_t * (1.0 - r * r)
            base = sample * (s_t / s_f * r) + d0 * phi + z * (s_t * math.sqrt(1.0 - r * r))
            if solver == "midpoint":
                return base + d1 * (0.5 * phi)
            return base + d1 * (a_t * ((1.0 - r * r) / (-2.0 * h) + 1.0))
        phi = s_t * math.expm1(h)
        base = sample * (a_t / a_f) - d0 * (2.0 * phi) + z * (s_t * math.sqrt(math.expm1(2 * h)))
        if solver == "midpoint":
            return base - d1 * phi
        return base - d1 * (2.0 * s_t * (math.expm1(h) / h - 1.0))


class DPMSolverMultistepScheduler(DPMSolverBase):
    name = "dpm_multistep"
    defaults = {**ExponentialIntegratorScheduler.defaults, "algorithm_type": "dpmsolver++",
                "solver_type": "midpoint", "euler_at_final": False}

    def step(self, model_output: Any, i: int, sample: Any, noise: NoiseSource | None = None) -> Any:
        if self._is_fresh_start(i):
            self.reset_state()
        c = self.config
        n = len(self.timesteps)
        order = int(c["solver_order"])
        lower_final = i == n - 1 and (c["euler_at_final"] or (c["lower_order_final"] and n < 15)
                                      or c["final_sigmas_type"] == "zero")
        lower_second = i == n - 2 and c["lower_order_final"] and n < 15
        self.remember(self.convert(model_output, sample, i))
        sig_t, sig_s0 = self.sigma(i + 1), self.sigma(i)
        if order == 1 or self.lower_order_nums < 1 or lower_final:
            prev = self.first_order(self.model_outputs[-1], sample, sig_s0, sig_t, noise)
        elif order == 2 or self.lower_order_nums < 2 or lower_second:
            prev = self._second(sample, sig_t, sig_s0, self.sigma(i - 1), noise)
        else:
            prev = self._third(sample, sig_t, sig_s0, self.sigma(i - 1), self.sigma(i - 2), noise)
        self.lower_order_nums = min(self.lower_order_nums + 1, order)
        return prev

    def _second(self, sample, sig_t, sig_s0, sig_s1, noise):
        m0, m1 = self.model_outputs[-1], self.model_outputs[-2]
        h, h0 = _h(sig_s0, sig_t), _h(sig_s1, sig_s0)
        d1 = (m0 - m1) * (h / h0)
        return self.second_order_terms(sample, m0, d1, sig_s0, sig_t, noise)

    def _third(self, sample, sig_t, sig_s0, sig_s1, sig_s2, noise):
        m0, m1, m2 = self.model_outputs[-1], self.model_outputs[-2], self.model_outputs[-3]
        h, h0, h1 = _h(sig_s0, sig_t), _h(sig_s1, sig_s0), _h(sig_s2, sig_s1)
        r0, r1 = h0 / h, h1 / h
        d1_0, d1_1 = (m0 - m1) * (1.0 / r0), (m1 - m2) * (1.0 / r1)
        d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
        d2 = (d1_0 - d1_1) * (1.0 / (r0 + r1))
        a_t, s_t = alpha_sigma(sig_t)
        a_s, s_s = alpha_sigma(sig_s0)
        e = math.exp(-h)
        kind = self.config["algorithm_type"]
        if kind == "dpmsolver++":
            return (sample * (s_t / s_s) - m0 * (a_t * (e - 1.0)) + d1 * (a_t * ((e - 1.0) / h + 1.0))
                    - d2 * (a_t * ((e - 1.0 + h) / h**2 - 0.5)))
        if kind == "dpmsolver":
            eh = math.expm1(h)
            return (sample * (a_t / a_s) - m0 * (s_t * eh) - d1 * (s_t * (eh / h - 1.0))
                    - d2 * (s_t * ((eh - h) / h**2 - 0.5)))
        if kind == "sde-dpmsolver++":
            z = self._noise(noise)
            return (sample * (s_t / s_s * e) + m0 * (a_t * (1.0 - e * e))
                    + d1 * (a_t * ((1.0 - e * e) / (-2.0 * h) + 1.0))
                    + d2 * (a_t * ((1.0 - e * e - 2.0 * h) / (2.0 * h) ** 2 - 0.5))
                    + z * (s_t * math.sqrt(1.0 - e * e)))
        raise ValueError("third-order sde-dpmsolver is not defined; use solver_order=2")


def singlestep_orders(steps: int, order: int, lower_order_final: bool, final_zero: bool) -> list[int]:
    """Order of each step of singlestep DPM-Solver (groups of 1, 2, 3 evaluations), as diffusers."""
    if lower_order_final:
        if order == 3:
            if steps % 3 == 0:
                orders = [1, 2, 3] * (steps // 3 - 1) + [1, 2] + [1]
            elif steps % 3 == 1:
                orders = [1, 2, 3] * (steps // 3) + [1]
            else:
                orders = [1, 2, 3] * (steps // 3) + [1, 2]
        elif order == 2:
            orders = [1, 2] * (steps // 2 - 1) + [1, 1] if steps % 2 == 0 else [1, 2] * (steps // 2) + [1]
        else:
            orders = [1] * steps
    else:
        orders = {3: [1, 2, 3] * (steps // 3), 2: [1, 2] * (steps // 2), 1: [1] * steps}[order]
    if final_zero and orders:
        orders[-1] = 1
    return orders


class DPMSolverSinglestepScheduler(DPMSolverBase):
    name = "dpm_singlestep"
    algorithms = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++")
    defaults = {**ExponentialIntegratorScheduler.defaults, "algorithm_type": "dpmsolver++",
                "solver_type": "midpoint", "lower_order_final": False}

    def base_timesteps(self, n: int) -> np.ndarray:
        # diffusers' singlestep solver always spaces by linspace, whatever timestep_spacing says.
        lambdas = np.log(np.sqrt(self.alphas_cumprod)) - np.log(np.sqrt(1.0 - self.alphas_cumprod))
        clipped = int(np.searchsorted(lambdas[::-1], float(self.config["lambda_min_clipped"])))
        total = int(self.config["num_train_timesteps"])
        return np.linspace(0, total - 1 - clipped, n + 1).round()[::-1][:-1].copy()

    def set_timesteps(self, num_inference_steps: int) -> None:
        super().set_timesteps(num_inference_steps)
        c = self.config
        # As diffusers: sigma 0 at the end (or an uneven step count) forces lower-order final steps.
        lower_final = c["lower_order_final"] or c["final_sigmas_type"] == "zero" \
            or num_inference_steps % int(c["solver_order"]) != 0
        self.orders = singlestep_orders(int(num_inference_steps), int(c["solver_order"]), lower_final,
                                        c["final_sigmas_type"] == "zero")

    def reset_state(self) -> None:
        super().reset_state()
        self.group_sample = None

    def step(self, model_output: Any, i: int, sample: Any, noise: NoiseSource | None = None) -> Any:
        if self._is_fresh_start(i):
            self.reset_state()
        self.remember(self.convert(model_output, sample, i))
        order = self.orders[i]
        while self.model_outputs[-order] is None:
            order -= 1
        if order == 1:
            self.group_sample = sample
        start = self.group_sample
        sig_t = self.sigma(i + 1)
        z = noise if self.stochastic else None
        if order == 1:
            return self.first_order(self.model_outputs[-1], start, self.sigma(i), sig_t, z)
        if order == 2:
            m0, m1 = self.model_outputs[-1], self.model_outputs[-2]
            sig_s0, sig_s1 = self.sigma(i), self.sigma(i - 1)
            h, h0 = _h(sig_s1, sig_t), _h(sig_s1, sig_s0)
            d1 = (m0 - m1) * (h / h0)
            return self.second_order_terms(start, m1, d1, sig_s1, sig_t, z)
        return self._third(start, i, sig_t, z)

    def _third(self, start, i, sig_t, noise):
        m0, m1, m2 = self.model_outputs[-1], self.model_outputs[-2], self.model_outputs[-3]
        sig_s0, sig_s1, sig_s2 = self.sigma(i), self.sigma(i - 1), self.sigma(i - 2)
        h, h0, h1 = _h(sig_s2, sig_t), _h(sig_s2, sig_s0), _h(sig_s2, sig_s1)
        r0, r1 = h0 / h, h1 / h
        d1_0, d1_1 = (m1 - m2) * (1.0 / r1), (m0 - m2) * (1.0 / r0)
        d1 = (d1_0 * r0 - d1_1 * r1) * (1.0 / (r0 - r1))
        d2 = (d1_1 - d1_0) * (2.0 / (r0 - r1))
        a_t, s_t = alpha_sigma(sig_t)
        a_s, s_s = alpha_sigma(sig_s2)
        e = math.exp(-h)
        kind, midpoint = self.config["algorithm_type"], self.config["solver_type"] == "midpoint"
        if kind == "dpmsolver++":
            x = start * (s_t / s_s) - m2 * (a_t * (e - 1.0))
            if midpoint:
                return x + d1_1 * (a_t * ((e - 1.0) / h + 1.0))
            return x + d1 * (a_t * ((e - 1.0) / h + 1.0)) - d2 * (a_t * ((e - 1.0 + h) / h**2 - 0.5))
        if kind == "dpmsolver":
            eh = math.expm1(h)
            x = start * (a_t / a_s) - m2 * (s_t * eh)
            if midpoint:
                return x - d1_1 * (s_t * (eh / h - 1.0))
            return x - d1 * (s_t * (eh / h - 1.0)) - d2 * (s_t * ((eh - h) / h**2 - 0.5))
        z = self._noise(noise)
        x = start * (s_t / s_s * e) + m2 * (a_t * (1.0 - e * e)) + z * (s_t * math.sqrt(1.0 - e * e))
        if midpoint:
            return x + d1_1 * (a_t * ((1.0 - e * e) / (-2.0 * h) + 1.0))
        return (x + d1 * (a_t * ((1.0 - e * e) / (-2.0 * h) + 1.0))
                + d2 * (a_t * ((1.0 - e * e - 2.0 * h) / (2.0 * h) ** 2 - 0.5)))
