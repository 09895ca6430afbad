"""UniPC (Zhao et al. 2023): multistep predictor with a corrector, as UniPCMultistepScheduler (B(h) variants)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .base import NoiseSource
from .exponential import ExponentialIntegratorScheduler
from .sigmas import alpha_sigma


class UniPCScheduler(ExponentialIntegratorScheduler):
    name = "unipc"
    defaults = {**ExponentialIntegratorScheduler.defaults, "solver_type": "bh2", "predict_x0": True,
                "disable_corrector": ()}

    def _validate_config(self) -> None:
        super()._validate_config()
        if self.config["solver_type"] not in ("bh1", "bh2"):
            raise ValueError(f"UniPC solver_type must be 'bh1' or 'bh2', got {self.config['solver_type']!r}")

    def reset_state(self) -> None:
        super().reset_state()
        self.last_sample = None
        self.this_order = 0

    def convert(self, model_output: Any, sample: Any, i: int) -> Any:
        if self.config["predict_x0"]:
            return self.data_prediction(model_output, sample, i)
        return self.noise_prediction(model_output, sample, i)

    def _coefficients(self, rks: list[float], h: float, order: int) -> tuple[np.ndarray, np.ndarray, float, float]:
        hh = -h if self.config["predict_x0"] else h
        h_phi_1 = math.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        factorial = 1
        b_h = hh if self.config["solver_type"] == "bh1" else math.expm1(hh)
        rks_arr = np.array(rks + [1.0])
        rows, b = [], []
        for k in range(1, order + 1):
            rows.append(rks_arr ** (k - 1))
            b.append(h_phi_k * factorial / b_h)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        return np.array(rows), np.array(b), h_phi_1, b_h

    def _base(self, x: Any, m0: Any, sig_s0: float, sig_t: float, h_phi_1: float) -> tuple[Any, float]:
        a_t, s_t = alpha_sigma(sig_t)
        a_s, s_s = alpha_sigma(sig_s0)
        if self.config["predict_x0"]:
            return x * (s_t / s_s) - m0 * (a_t * h_phi_1), a_t
        # sigma_t * (e^h - 1) = alpha_t * (sigma_s - sigma_t) in k-diffusion sigmas: finite at sigma_t = 0.
        return x * (a_t / a_s) - m0 * (a_t * (sig_s0 - sig_t)), s_t

    def _predict(self, x: Any, i: int, order: int) -> Any:
        m = self.model_outputs
        m0 = m[-1]
        sig_t, sig_s0 = self.sigma(i + 1), self.sigma(i)
        h = math.log(sig_s0 / sig_t) if sig_t > 0 else math.inf
        rks, d1s = [], []
        for k in range(1, order):
            rk = math.log(sig_s0 / self.sigma(i - k)) / h
            rks.append(rk)
            d1s.append((m[-(k + 1)] - m0) * (1.0 / rk))
        rows, b, h_phi_1, b_h = self._coefficients(rks, h, order)
        base, scale = self._base(x, m0, sig_s0, sig_t, h_phi_1)
        if not d1s:
            return base
        rhos = np.array([0.5]) if order == 2 else np.linalg.solve(rows[:-1, :-1], b[:-1])
        res = sum(d * float(r) for d, r in zip(d1s, rhos))
        return base - res * (scale * b_h)

    def _correct(self, model_t: Any, x: Any, x_t: Any, i: int, order: int) -> Any:
        m = self.model_outputs
        m0 = m[-1]
        sig_t, sig_s0 = self.sigma(i), self.sigma(i - 1)
        h = math.log(sig_s0 / sig_t)
        rks, d1s = [], []
        for k in range(1, order):
            rk = math.log(sig_s0 / self.sigma(i - (k + 1))) / h
            rks.append(rk)
            d1s.append((m[-(k + 1)] - m0) * (1.0 / rk))
        rows, b, h_phi_1, b_h = self._coefficients(rks, h, order)
        base, scale = self._base(x, m0, sig_s0, sig_t, h_phi_1)
        rhos = np.array([0.5]) if order == 1 else np.linalg.solve(rows, b)
        res = (model_t - m0) * float(rhos[-1])
        for d, r in zip(d1s, rhos[:-1]):
            res = res + d * float(r)
        return base - res * (scale * b_h)

    def step(self, model_output: Any, i: int, sample: Any, noise: NoiseSource | None = None) -> Any:
        if self._is_fresh_start(i):
            self.reset_state()
        c = self.config
        converted = self.convert(model_output, sample, i)
        if i > 0 and (i - 1) not in tuple(c["disable_corrector"]) and self.last_sample is not None:
            sample = self._correct(converted, self.last_sample, sample, i, self.this_order)
        self.remember(converted)
        order = int(c["solver_order"])
        this_order = min(order, len(self.timesteps) - i) if c["lower_order_final"] else order
        self.this_order = min(this_order, self.lower_order_nums + 1)
        self.last_sample = sample
        prev = self._predict(sample, i, self.this_order)
        self.lower_order_nums = min(self.lower_order_nums + 1, order)
        return prev
