"""Noise-level (sigma) helpers shared by the k-diffusion and DPM-Solver families."""

from __future__ import annotations

import math

import numpy as np


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) eq. 5: ``n`` sigmas from sigma_max down to sigma_min, denser near sigma_min."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep whose sigma is ``sigma`` (linear in log sigma, as diffusers)."""
    sigma = np.asarray(sigma, dtype=np.float64)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma.reshape(1, -1) - log_sigmas[:, None]
    low = np.clip(np.cumsum(dists >= 0, axis=0).argmax(axis=0), 0, log_sigmas.shape[0] - 2)
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma.reshape(-1)) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    return ((1 - w) * low + w * high).reshape(sigma.shape)


def alpha_sigma(sigma: float) -> tuple[float, float]:
    """VP coefficients (alpha_t, sigma_t) of the k-diffusion noise level ``sigma``."""
    alpha = 1.0 / math.sqrt(sigma**2 + 1.0)
    return alpha, sigma * alpha


def log_snr(sigma: float) -> float:
    """lambda = log(alpha_t / sigma_t) = -log(sigma); -inf... +inf handled (sigma 0 gives +inf)."""
    return math.inf if sigma == 0 else -math.log(sigma)


def ancestral_split(sigma_from: float, sigma_to: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step from ``sigma_from`` to ``sigma_to``."""
    if sigma_to == 0:
        return 0.0, 0.0
    up = math.sqrt(max(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2, 0.0))
    return math.sqrt(max(sigma_to**2 - up**2, 0.0)), up
