"""DEIS (Zhang & Chen 2022), multistep with the log-rho polynomial, as DEISMultistepScheduler."""

from __future__ import annotations

import math
from typing import Any

from .base import NoiseSource
from .exponential import ExponentialIntegratorScheduler
from .sigmas import alpha_sigma


def _integral2(t: float, b: float, c: float) -> float:
    """Antiderivative of the Lagrange basis (log t - log c) / (log b - log c)."""
    return t * (-math.log(c) + math.log(t) - 1) / (math.log(b) - math.log(c))


def _integral3(t: float, b: float, c: float, d: float) -> float:
    """Antiderivative of (log t - log c)(log t - log d) / ((log b - log c)(log b - log d))."""
    lt, lc, ld = math.log(t), math.log(c), math.log(d)
    numerator = t * (lc * (ld - lt + 1) - ld * lt + ld + lt**2 - 2 * lt + 2)
    return numerator / ((math.log(b) - lc) * (math.log(b) - ld))


class DEISScheduler(ExponentialIntegratorScheduler):
    name = "deis"
    defaults = {**ExponentialIntegratorScheduler.defaults, "algorithm_type": "deis", "solver_type": "logrho"}

    def _validate_config(self) -> None:
        super()._validate_config()
        if self.config["algorithm_type"] != "deis" or self.config["solver_type"] != "logrho":
            raise ValueError("DEIS supports algorithm_type='deis' with solver_type='logrho' only")

    def final_sigma(self) -> float:
        return float(self.train_sigmas[0])  # diffusers' DEIS always ends at the smallest training sigma

    def step(self, model_output: Any, i: int, sample: Any, noise: NoiseSource | None = None) -> Any:
        if self._is_fresh_start(i):
            self.reset_state()
        c = self.config
        n = len(self.timesteps)
        order = int(c["solver_order"])
        short = c["lower_order_final"] and n < 15
        lower_final, lower_second = i == n - 1 and short, i == n - 2 and short
        self.remember(self.noise_prediction(model_output, sample, i))
        sig_t, sig_s0 = self.sigma(i + 1), self.sigma(i)
        a_t, s_t = alpha_sigma(sig_t)
        a_s0, _ = alpha_sigma(sig_s0)
        m = self.model_outputs
        if order == 1 or self.lower_order_nums < 1 or lower_final:
            prev = sample * (a_t / a_s0) - m[-1] * (s_t * math.expm1(math.log(sig_s0 / sig_t)))
        elif order == 2 or self.lower_order_nums < 2 or lower_second:
            # rho = sigma_t / alpha_t is the k-diffusion sigma itself.
            rt, r0, r1 = sig_t, sig_s0, self.sigma(i - 1)
            c1 = _integral2(rt, r0, r1) - _integral2(r0, r0, r1)
            c2 = _integral2(rt, r1, r0) - _integral2(r0, r1, r0)
            prev = (sample * (1.0 / a_s0) + m[-1] * c1 + m[-2] * c2) * a_t
        else:
            rt, r0, r1, r2 = sig_t, sig_s0, self.sigma(i - 1), self.sigma(i - 2)
            c1 = _integral3(rt, r0, r1, r2) - _integral3(r0, r0, r1, r2)
            c2 = _integral3(rt, r1, r2, r0) - _integral3(r0, r1, r2, r0)
            c3 = _integral3(rt, r2, r0, r1) - _integral3(r0, r2, r0, r1)
            prev = (sample * (1.0 / a_s0) + m[-1] * c1 + m[-2] * c2 + m[-3] * c3) * a_t
        self.lower_order_nums = min(self.lower_order_nums + 1, order)
        return prev
