"""One seeded Brownian path per run, for the SDE samplers, on numpy: the same seed gives the same path on
every backend and machine, and every query is answered from the path itself, whatever the query order.

DPM-Solver++ SDE (k-diffusion's ``sample_dpmpp_sde``, diffusers' ``DPMSolverSDEScheduler``) moves from
sigma_k to the midpoint and, from sigma_k again, to sigma_k+1; the two noises are the increments of one
Brownian motion over nested intervals, so they are correlated (sqrt of the ratio of the lengths). diffusers
gets them from torchsde's ``BrownianTree``; ``BrownianTree`` here answers the same ``W(tb) - W(ta)`` queries.

Construction (Levy's): W(t0) = 0, W(t1) ~ N(0, t1 - t0), and the value at the midpoint of every dyadic
interval [a, b] is drawn from the Brownian bridge, (W(a) + W(b)) / 2 + sqrt((b - a) / 4) * Z, with Z from
a generator seeded by (seed, depth, index) alone. A point t is reached by halving down to an interval
no wider than ``tol`` and interpolating linearly inside it (the truncated Levy-Ciesielski series: at most
``tol / 4`` of variance missing, as torchsde's tree resolves to ``tol``); dyadic points are exact.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

SEED_BOUND = 2**63 - 1  # seeds drawn from a pipeline's generator lie in [0, SEED_BOUND)


class BrownianTree:
    """A Brownian motion W on [t0, t1] with W(t0) = 0, of array shape ``shape``, fixed by ``seed``."""

    def __init__(self, t0: float, t1: float, shape: tuple[int, ...], seed: int, tol: float = 1e-6) -> None:
        t0, t1 = float(t0), float(t1)
        if not (math.isfinite(t0) and math.isfinite(t1) and t1 > t0):
            raise ValueError(f"a Brownian tree needs finite t0 < t1, got [{t0}, {t1}]")
        if not tol > 0:
            raise ValueError(f"tol must be positive, got {tol}")
        self.t0, self.t1, self.shape, self.seed = t0, t1, tuple(int(s) for s in shape), int(seed)
        self.depth = max(0, math.ceil(math.log2((t1 - t0) / tol)))
        self._end = self._normal(-1, 0) * math.sqrt(t1 - t0)

    def _normal(self, depth: int, index: int) -> np.ndarray:
        """The standard-normal draw owned by one node of the tree (depth -1: the end point)."""
        sequence = np.random.SeedSequence(entropy=self.seed, spawn_key=(depth + 1, index))
        return np.random.Generator(np.random.PCG64(sequence)).standard_normal(self.shape)

    def value(self, t: float) -> np.ndarray:
        """W(t) - W(t0), float64."""
        t = float(t)
        if not self.t0 <= t <= self.t1:
            raise ValueError(f"t={t} lies outside the tree's interval [{self.t0}, {self.t1}]")
        span = self.t1 - self.t0
        lo, hi = 0, 1  # the current interval is [lo, hi] / 2**depth of the span
        w_lo, w_hi = np.zeros(self.shape), self._end
        for depth in range(self.depth):
            a, b = self.t0 + span * lo / 2**depth, self.t0 + span * hi / 2**depth
            if t == a:
                return w_lo
            if t == b:
                return w_hi
            mid = (a + b) / 2
            w_mid = (w_lo + w_hi) / 2 + self._normal(depth, lo) * math.sqrt((b - a) / 4)
            if t < mid:
                lo, hi, w_hi = 2 * lo, 2 * lo + 1, w_mid
            else:
                lo, hi, w_lo = 2 * lo + 1, 2 * lo + 2, w_mid
        a, b = self.t0 + span * lo / 2**self.depth, self.t0 + span * hi / 2**self.depth
        weight = (t - a) / (b - a)
        return w_lo * (1.0 - weight) + w_hi * weight

    def __call__(self, ta: float, tb: float) -> np.ndarray:
        """The increment W(tb) - W(ta) (negative when tb < ta), float64."""
        return self.value(tb) - self.value(ta)


class BrownianNoise:
    """diffusers' ``BrownianTreeNoiseSampler`` on a ``BrownianTree`` over sigma: ``(sigma, sigma_next)`` ->
    ``(W(sigma_next) - W(sigma)) / sqrt(|sigma_next - sigma|)``, standard normal for each query, correlated
    across overlapping ones; returned through ``to_native`` (numpy in diffusers' layout by default)."""

    def __init__(self, tree: BrownianTree, to_native: Callable[[np.ndarray], Any] = lambda a: a) -> None:
        self.tree, self.to_native = tree, to_native

    def __call__(self, sigma: float, sigma_next: float) -> Any:
        sigma, sigma_next = float(sigma), float(sigma_next)
        increment = self.tree(sigma, sigma_next) / math.sqrt(abs(sigma_next - sigma))
        return self.to_native(increment.astype(np.float32))


class StepNoise:
    """The noise a stochastic sampler draws, from one seeded numpy generator: calling it gives fresh
    standard-normal draws of ``shape`` (diffusers' layout, through ``to_native``); ``brownian(t0, t1)``
    gives a Brownian path over [t0, t1] whose seed is the generator's next draw."""

    def __init__(self, shape: tuple[int, ...], rng: np.random.Generator,
                 to_native: Callable[[np.ndarray], Any] = lambda a: a) -> None:
        self.shape, self.rng, self.to_native = tuple(shape), rng, to_native

    def __call__(self) -> Any:
        return self.to_native(self.rng.standard_normal(self.shape).astype(np.float32))

    def brownian(self, t0: float, t1: float) -> BrownianNoise:
        seed = int(self.rng.integers(0, SEED_BOUND))
        return BrownianNoise(BrownianTree(t0, t1, self.shape, seed), self.to_native)


def brownian_noise(noise: Any, t0: float, t1: float, sampler: str) -> BrownianNoise:
    """The Brownian path a run of ``sampler`` draws from ``noise`` (which must be able to give one)."""
    if not callable(getattr(noise, "brownian", None)):
        raise ValueError(f"{sampler} draws its noise from one Brownian path: pass a noise source with a "
                         f"brownian(t0, t1) method (schedulers.brownian.StepNoise), got {type(noise).__name__}")
    return noise.brownian(t0, t1)


__all__ = ["BrownianTree", "BrownianNoise", "StepNoise", "brownian_noise"]
