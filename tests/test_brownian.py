"""The Brownian path of the SDE samplers: a Brownian motion (increments, joint statistics, against the
analytic values and torchsde's tree), the same path for the same seed whatever the query order, and
DPM++ SDE's two sub-step noises correlated as one path makes them (diffusers parity: test_schedulers)."""

import math

import numpy as np
import pytest

from mlx_stablefused.schedulers import make_scheduler
from mlx_stablefused.schedulers.brownian import BrownianNoise, BrownianTree, StepNoise, brownian_noise

SD15 = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
        "steps_offset": 1, "timestep_spacing": "leading"}
N = 20000  # independent Brownian motions per array element: the correlation's standard error is ~0.005


def correlation(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def test_a_seed_fixes_the_path_whatever_the_query_order():
    """Queries are answered from the path, not from the order they come in; dyadic points are exact and
    increments add up; the values are pinned (numpy's PCG64 and SeedSequence are the same on every machine)."""
    tree = BrownianTree(0.03, 14.6, (3,), seed=2024)
    queries = [(14.6, 12.1), (12.1, 10.0), (0.03, 1.7), (14.6, 10.0), (5.5, 5.50001)]
    forward = [tree(a, b) for a, b in queries]
    other = BrownianTree(0.03, 14.6, (3,), seed=2024)
    backward = [other(a, b) for a, b in reversed(queries)][::-1]
    for f, b in zip(forward, backward):
        np.testing.assert_array_equal(f, b)
    np.testing.assert_allclose(tree(14.6, 10.0), tree(14.6, 12.1) + tree(12.1, 10.0), atol=1e-12)
    np.testing.assert_allclose(tree.value(14.6), tree._end)
    np.testing.assert_allclose(tree.value(0.03), 0.0)
    np.testing.assert_allclose(tree.value(7.0), [-0.1656303537, -2.6020570175, -2.1995279024], atol=1e-9)
    assert not np.allclose(BrownianTree(0.03, 14.6, (3,), seed=2025).value(7.0), tree.value(7.0))
    with pytest.raises(ValueError, match="outside"):
        tree.value(20.0)


def test_increments_are_brownian_against_analytic_values_and_torchsde():
    """Var W(tb) - W(ta) = |tb - ta| at every scale, disjoint increments are independent and nested ones
    correlate as sqrt(inner / outer); torchsde's BrownianTree (diffusers' source) gives the same."""
    torchsde = pytest.importorskip("torchsde")
    import torch

    ours = BrownianTree(0.03, 14.6, (N,), seed=1)
    ref = torchsde.BrownianTree(t0=0.03, w0=torch.zeros(N, dtype=torch.float64), t1=14.6, entropy=1)

    def theirs(a, b):
        return (ref(min(a, b), max(a, b)) * (1 if b > a else -1)).numpy()

    for a, b in [(14.6, 0.03), (2.0, 2.001), (0.05, 0.03)]:
        assert abs(ours(a, b).std() / math.sqrt(abs(b - a)) - 1) < 0.03, (a, b)
    for source in (ours, theirs):
        inner, outer = source(14.6, 12.08), source(14.6, 10.0)
        assert abs(correlation(inner, outer) - math.sqrt(2.52 / 4.6)) < 0.02
        assert abs(correlation(source(14.6, 12.0), source(12.0, 9.0))) < 0.02


def test_dpm_sde_substep_noises_are_one_brownian_path():
    """The two noises of every DPM++ SDE step (sigma_k -> midpoint, sigma_k -> sigma_k+1) correlate as
    sqrt((sigma_k - mid) / (sigma_k - sigma_k+1)) (independent draws gave 0); consecutive steps' noises
    are independent; each is standard normal."""
    for name in ("dpm_sde", "dpm_sde_karras"):
        s = make_scheduler(name, SD15)
        s.set_timesteps(6)
        draws = []

        class Recording(StepNoise):
            def brownian(self, t0, t1):
                path = super().brownian(t0, t1)

                def record(sigma, sigma_next):
                    draws.append((sigma, sigma_next, path(sigma, sigma_next)))
                    return draws[-1][2]
                return record

        noise = Recording((N,), np.random.default_rng(0))
        x = np.random.default_rng(1).standard_normal(N) * s.init_noise_sigma
        for i in range(len(s.timesteps)):
            x = s.step(0.1 * s.scale_model_input(x, i), i, x, noise)
        assert len(draws) == 2 * (len(s.step_sigmas) - 2)  # two per step but the last (to sigma 0)
        for (s0, mid, first), (s0b, s1, second) in zip(draws[0::2], draws[1::2]):
            assert s0 == s0b and s0 > mid > s1
            assert abs(correlation(first, second) - math.sqrt((s0 - mid) / (s0 - s1))) < 0.02, (name, s0)
            assert abs(first.std() - 1) < 0.03 and abs(second.std() - 1) < 0.03
        for (_, _, second), (_, _, first) in zip(draws[1:-1:2], draws[2::2]):
            assert abs(correlation(second, first)) < 0.02


def test_a_plain_noise_callable_is_refused_by_the_sde_sampler():
    s = make_scheduler("dpm_sde", SD15)
    s.set_timesteps(3)
    with pytest.raises(ValueError, match="one Brownian path"):
        s.step(np.zeros(4), 0, np.ones(4), lambda: np.zeros(4))
    with pytest.raises(ValueError, match="t0 < t1"):
        BrownianTree(1.0, 1.0, (2,), seed=0)
    assert isinstance(brownian_noise(StepNoise((2,), np.random.default_rng(0)), 0.1, 1.0, "x"), BrownianNoise)
