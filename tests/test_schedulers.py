"""Every sampler against its diffusers class: timestep/sigma tables and full step trajectories.

Stochastic samplers get the same noise on both sides (diffusers' randn_tensor / noise sampler
patched to read from our queue), so they must match exactly; a statistical test checks the
noise our samplers inject.
"""

import importlib

import numpy as np
import pytest
import torch

from helpers import DIFFUSERS_SCHEDULERS, diffusers_scheduler
from mlx_stablefused.schedulers import SCHEDULER_NAMES, default_scheduler_name, make_scheduler
from mlx_stablefused.schedulers.brownian import BrownianNoise, BrownianTree, StepNoise

SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
CONFIGS = {
    "sd15": {**SD, "_class_name": "PNDMScheduler", "set_alpha_to_one": False, "skip_prk_steps": True,
             "steps_offset": 1, "clip_sample": False},
    "sd2-v": {**SD, "_class_name": "DDIMScheduler", "set_alpha_to_one": False, "steps_offset": 1,
              "clip_sample": False, "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
    "linspace-linear": {"beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                        "timestep_spacing": "linspace", "set_alpha_to_one": True},
    "cosine-sample": {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "sample", "clip_sample": True,
                      "timestep_spacing": "leading", "steps_offset": 1},
}
NO_SAMPLE_PREDICTION = {"pndm", "euler_ancestral", "dpm2", "dpm2_ancestral", "dpm2_karras",
                        "dpm2_karras_ancestral", "dpm_sde", "dpm_sde_karras"}
TABLE_STEPS = [1, 2, 50]  # 4, 7 and 25 steps: the trajectory tests compare the whole table first
TRAJECTORY_STEPS = [4, 7, 25]
# Our tables are float64; diffusers' are float32, whose 1 - alphas_cumprod near t=0 carries ~1e-5
# relative error, and whose step arithmetic on values of size S has an absolute resolution of about
# 1e-7 * S per operation. Tolerances below are set by that reference error, not by ours.
RTOL = 1e-4
T_ATOL = 2e-2  # fractional timesteps from float32 sigma tables, in units of training steps


def assert_close(ours, ref, msg="", tol=(RTOL, 2e-5)):
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(ours, ref, rtol=tol[0], atol=tol[1] * scale, err_msg=msg)


def cases():
    for name in DIFFUSERS_SCHEDULERS:
        for cfg_name, cfg in CONFIGS.items():
            if cfg.get("prediction_type") == "sample" and name in NO_SAMPLE_PREDICTION:
                continue
            if cfg_name == "cosine-sample" and name in ("dpm_multistep_karras", "dpm_singlestep_karras"):
                continue  # diffusers truncates float32 sigma_to_t (998.9999 -> 998) to int64 here
            yield name, cfg_name


def tolerance(cfg_name):
    """The cosine schedule's alphas_cumprod is within 4e-5 of 1 near t=0, where diffusers' float32
    1 - alphas_cumprod keeps only ~3 significant digits; elsewhere float32 keeps ~6."""
    return (2e-3, 5e-4) if cfg_name == "cosine-sample" else (RTOL, 2e-5)


class NoiseQueue:
    """One stream of Gaussian draws, served to diffusers (as torch) and to us (as numpy) in call order;
    and one Brownian path (``path``), which our SDE sampler asks for and diffusers' noise sampler reads."""

    def __init__(self, shape, seed):
        self.shape, self.rng, self.draws, self.path = shape, np.random.default_rng(seed), [], None

    def brownian(self, t0, t1):
        assert self.path is not None and (t0, t1) == (self.path.tree.t0, self.path.tree.t1)
        return self.path

    def __call__(self):
        z = self.rng.standard_normal(self.shape)
        self.draws.append(z)
        return z

    def torch_side(self):
        self.pos = getattr(self, "pos", 0)
        if self.pos == len(self.draws):
            self.draws.append(self.rng.standard_normal(self.shape))
        z = self.draws[self.pos]
        self.pos += 1
        return torch.from_numpy(z)


def run_both(name, cfg, steps, monkeypatch, shape=(2, 4, 5, 3), seed=0, tol=(RTOL, 2e-5), **overrides):
    ref = diffusers_scheduler(name, cfg, **overrides)
    ours = make_scheduler(name, cfg, **overrides)
    ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    ours_q, ref_q = NoiseQueue(shape, 123), NoiseQueue(shape, 123)
    module = importlib.import_module(type(ref).__module__)
    if hasattr(module, "randn_tensor"):
        monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: ref_q.torch_side())
    if hasattr(ref, "noise_sampler"):  # DPMSolverSDEScheduler: both read one Brownian path over sigma
        sigmas = np.concatenate([ours.step_sigmas, ours.mid_sigmas])
        positive = ours.step_sigmas[ours.step_sigmas > 0]
        ours_q.path = BrownianNoise(BrownianTree(positive.min(), positive.max(), shape, seed=5))

        def at_our_sigma(s):  # diffusers' float32 sigma -> the same entry of our float64 table
            return float(sigmas[np.argmin(np.abs(sigmas - float(s)))])

        ref.noise_sampler = lambda s, s_next: torch.from_numpy(ours_q.path(at_our_sigma(s), at_our_sigma(s_next)))
    rng = np.random.default_rng(seed)
    x_ref = rng.standard_normal(shape) * float(ours.init_noise_sigma)
    x_ours = x_ref.copy()
    assert_same_table(ours, ref)
    for i, t in enumerate(ref.timesteps):
        assert abs(float(ours.timesteps[i]) - float(t)) < T_ATOL + RTOL * abs(float(t)), (i, ours.timesteps[i], t)
        fixed = rng.standard_normal(shape)
        ref_in = ref.scale_model_input(torch.from_numpy(x_ref), t).numpy()
        ours_in = ours.scale_model_input(x_ours, i)
        assert_close(ours_in, ref_in, f"input scaling, step {i}", tol)
        out = 0.3 * ref_in + fixed  # a model output that depends on its input
        x_ref = ref.step(torch.from_numpy(out), t, torch.from_numpy(x_ref)).prev_sample.numpy()
        x_ours = ours.step(0.3 * ours_in + fixed, i, x_ours, ours_q)
        if not np.isfinite(x_ref).all() and i >= 3:  # diffusers' UniPC noise mode: NaN at its last step
            assert np.isfinite(x_ours).all()
            return x_ours
        assert_close(x_ours, x_ref, f"step {i} (t={t})", tol)
    assert len(ours.timesteps) == len(ref.timesteps)
    return x_ours


def assert_same_table(ours, ref):
    """Our timestep table and initial sigma vs diffusers' (which may hold NaN where ours must not)."""
    expected = ref.timesteps.numpy().astype(np.float64)
    assert len(ours.timesteps) == len(expected) and np.isfinite(ours.timesteps).all()
    finite = np.isfinite(expected)  # diffusers' KDPM2 ancestral yields a NaN midpoint at 2 steps
    np.testing.assert_allclose(ours.timesteps[finite], expected[finite], rtol=RTOL, atol=T_ATOL)
    np.testing.assert_allclose(ours.init_noise_sigma, float(ref.init_noise_sigma), rtol=RTOL)


def table_cases():
    for steps in TABLE_STEPS:
        yield from ((name, cfg_name, steps) for name, cfg_name in cases())
    yield from ((name, cfg_name, 25) for name, cfg_name in cases() if name == "lcm")  # its trajectory stops at 8


@pytest.mark.parametrize("name,cfg_name,steps", list(table_cases()))
def test_tables_match(name, cfg_name, steps):
    cfg = CONFIGS[cfg_name]
    ref = diffusers_scheduler(name, cfg)
    ours = make_scheduler(name, cfg)
    try:
        ref.set_timesteps(steps)
    except (ValueError, RuntimeError):  # e.g. PNDM's Runge-Kutta warm-up needs >= 4 steps
        with pytest.raises(ValueError):
            ours.set_timesteps(steps)
        return
    ours.set_timesteps(steps)
    assert_same_table(ours, ref)


@pytest.mark.parametrize("name,cfg_name", list(cases()))
@pytest.mark.parametrize("steps", TRAJECTORY_STEPS)
def test_trajectory_matches(name, cfg_name, steps, monkeypatch):
    if name == "lcm" and steps == 25:
        steps = 8
    run_both(name, CONFIGS[cfg_name], steps, monkeypatch, tol=tolerance(cfg_name))


@pytest.mark.parametrize("name,overrides", [
    ("dpm_multistep", {"solver_order": 3}),
    ("dpm_multistep", {"solver_order": 3, "algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    ("dpm_multistep", {"solver_type": "heun"}),
    ("dpm_multistep", {"algorithm_type": "dpmsolver", "solver_type": "heun", "final_sigmas_type": "sigma_min"}),
    ("dpm_multistep", {"algorithm_type": "sde-dpmsolver++"}),
    ("dpm_multistep", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}),
    ("dpm_multistep", {"final_sigmas_type": "sigma_min"}),
    ("dpm_multistep", {"euler_at_final": True, "lower_order_final": False}),
    ("dpm_singlestep", {"solver_order": 3}),
    ("dpm_singlestep", {"solver_order": 3, "solver_type": "heun"}),
    ("dpm_singlestep", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    ("dpm_singlestep", {"algorithm_type": "sde-dpmsolver++"}),
    ("deis", {"solver_order": 3}),
    ("unipc", {"solver_order": 3}),
    ("unipc", {"solver_type": "bh1"}),
    ("unipc", {"predict_x0": False, "final_sigmas_type": "sigma_min"}),  # diffusers: NaN at sigma 0
    ("unipc", {"disable_corrector": [0, 1]}),
    ("ddpm", {"variance_type": "fixed_large"}),
    ("euler", {"use_karras_sigmas": True}),
    ("heun", {"use_karras_sigmas": True}),
    ("linear_multistep", {"use_karras_sigmas": True}),
    ("pndm", {"skip_prk_steps": False}),
])
@pytest.mark.parametrize("steps", [6, 20])
def test_options_match(name, overrides, steps, monkeypatch):
    run_both(name, CONFIGS["sd15"], steps, monkeypatch, **overrides)


def test_ddim_eta(monkeypatch):
    ref = diffusers_scheduler("ddim", CONFIGS["sd15"])
    ours = make_scheduler("ddim", CONFIGS["sd15"], eta=0.7)
    ref.set_timesteps(10)
    ours.set_timesteps(10)
    rng = np.random.default_rng(0)
    x_ref = rng.standard_normal((1, 4, 3, 3))
    x_ours = x_ref.copy()
    for i, t in enumerate(ref.timesteps):
        out, z = rng.standard_normal(x_ref.shape), rng.standard_normal(x_ref.shape)
        x_ref = ref.step(torch.from_numpy(out), t, torch.from_numpy(x_ref), eta=0.7,
                         variance_noise=torch.from_numpy(z)).prev_sample.numpy()
        x_ours = ours.step(out, i, x_ours, lambda: z)
        assert_close(x_ours, x_ref)


@pytest.mark.parametrize("name", [n for n in SCHEDULER_NAMES if make_scheduler(n).stochastic] + ["dpm_multistep"])
def test_injected_noise_statistics(name):
    """The noise a stochastic step adds is Gaussian with the variance the formula gives, fresh per step."""
    overrides = {"algorithm_type": "sde-dpmsolver++"} if name == "dpm_multistep" else {}
    s = make_scheduler(name, CONFIGS["sd15"], **overrides)
    s.set_timesteps(10)
    shape = (4, 4, 32, 32)
    x = np.random.default_rng(0).standard_normal(shape) * s.init_noise_sigma
    out = np.random.default_rng(1).standard_normal(shape)
    rng_a, rng_b = np.random.default_rng(10), np.random.default_rng(11)
    i = 2 if len(s.timesteps) > 2 else 0
    zero = s.step(out, i, x, lambda: np.zeros(shape)) if i == 0 else None
    # Run to step i twice with independent noise, so only the injected noise differs.
    def run(rng):
        s.set_timesteps(10)
        y = x.copy()
        for k in range(i + 1):
            y = s.step(out, k, y, StepNoise(shape, rng))
        return y
    a, b = run(rng_a), run(rng_b)
    diff = (a - b).ravel()
    assert abs(diff.mean()) < 0.05 * diff.std()
    assert diff.std() > 0
    kurt = np.mean(((diff - diff.mean()) / diff.std()) ** 4)
    assert abs(kurt - 3.0) < 0.2  # Gaussian
    assert zero is None or np.isfinite(zero).all()


def test_pndm_runge_kutta_needs_four_steps():
    with pytest.raises(ValueError, match="at least 4 steps"):
        make_scheduler("pndm", CONFIGS["sd15"], skip_prk_steps=False).set_timesteps(3)


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_rerunning_a_schedule_starts_fresh(name):
    ours = make_scheduler(name, CONFIGS["sd15"])
    ours.set_timesteps(5)

    def run():
        rng = np.random.default_rng(3)
        x = np.ones((1, 4, 2, 2))
        for i in range(len(ours.timesteps)):
            x = ours.step(0.1 * ours.scale_model_input(x, i), i, x, StepNoise((1, 4, 2, 2), rng))
        return x

    np.testing.assert_array_equal(run(), run())


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="valid names: .*ddim"):
        make_scheduler("dpm_superfast", CONFIGS["sd15"])


def test_all_stablefused_names_exist():
    stablefused = {"deis", "ddim", "ddpm", "dpm2_karras", "dpm2_karras_ancestral", "dpm_sde", "dpm_sde_karras",
                   "dpm_multistep", "dpm_multistep_karras", "dpm_singlestep", "dpm_singlestep_karras", "euler",
                   "euler_ancestral", "heun", "linear_multistep", "pndm", "unipc"}
    assert stablefused | {"lcm"} <= set(SCHEDULER_NAMES)


def test_unknown_override_is_rejected():
    with pytest.raises(TypeError, match="unknown option"):
        make_scheduler("ddim", CONFIGS["sd15"], use_magic=True)


def test_bad_step_counts():
    s = make_scheduler("ddim", CONFIGS["sd15"])
    for bad in (0, -3, 2.5, 1001):
        with pytest.raises(ValueError):
            s.set_timesteps(bad)
    with pytest.raises(ValueError, match="original_inference_steps"):
        make_scheduler("lcm", CONFIGS["sd15"]).set_timesteps(51)


def test_bad_config_values():
    with pytest.raises(ValueError, match="beta_schedule"):
        make_scheduler("ddim", {**CONFIGS["sd15"], "beta_schedule": "wobbly"})
    with pytest.raises(ValueError, match="prediction_type"):
        make_scheduler("pndm", {**CONFIGS["sd15"], "prediction_type": "sample"})
    with pytest.raises(ValueError, match="solver_order"):
        make_scheduler("dpm_multistep", CONFIGS["sd15"], solver_order=4)
    with pytest.raises(ValueError, match="algorithm_type"):
        make_scheduler("dpm_singlestep", CONFIGS["sd15"], algorithm_type="sde-dpmsolver")


def test_default_scheduler_follows_model():
    assert default_scheduler_name(CONFIGS["sd15"]) == "pndm"
    assert default_scheduler_name(CONFIGS["sd2-v"]) == "ddim"
    assert default_scheduler_name({"_class_name": "EulerDiscreteScheduler"}) == "euler"
    assert default_scheduler_name({"_class_name": "FlowMatchEulerDiscreteScheduler"}) == "ddim"


def test_works_on_mlx_arrays():
    import mlx.core as mx

    s = make_scheduler("ddim", CONFIGS["cosine-sample"])  # clip_sample exercises the array helper
    s.set_timesteps(4)
    x = np.random.default_rng(0).standard_normal((1, 2, 2, 4)).astype(np.float32)
    a = s.step(x * 0.5, 1, x)
    b = s.step(mx.array(x * 0.5), 1, mx.array(x))
    np.testing.assert_allclose(np.asarray(b), a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(DIFFUSERS_SCHEDULERS))
def test_add_noise_matches_at_fractional_and_integer_timesteps(name):
    """Image-to-image noising at step i of the table (stablefused truncated fractional timesteps)."""
    ref = diffusers_scheduler(name, CONFIGS["sd15"])
    ours = make_scheduler(name, CONFIGS["sd15"])
    ref.set_timesteps(10)
    ours.set_timesteps(10)
    rng = np.random.default_rng(0)
    x0, noise = rng.standard_normal((1, 4, 3, 3)), rng.standard_normal((1, 4, 3, 3))
    for i in (0, 2, 6):
        t = ref.timesteps[i:i + 1]
        if name == "pndm":
            t = t.long()
        expected = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), t).numpy()
        assert_close(ours.add_noise(x0, noise, i), expected, f"index {i}")
