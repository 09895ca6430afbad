"""Samplers against the diffusers classes: timestep/sigma tables and full step trajectories."""

import numpy as np
import pytest
import torch

from mlx_stablefused.schedulers import SCHEDULER_NAMES, default_scheduler_name, make_scheduler

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
CLASSES = {"ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "euler": "EulerDiscreteScheduler"}
STEPS = [1, 2, 7, 25, 50]
# Our tables are float64; diffusers' are float32, whose 1 - alphas_cumprod near t=0 carries ~1e-5
# relative error. Tolerances below are set by that reference error, not by ours.
RTOL = 1e-4


def diffusers_scheduler(name, config, **overrides):
    import diffusers

    cls = getattr(diffusers, CLASSES[name])
    return cls.from_config({**config, **overrides})


def cases():
    for name in CLASSES:
        for cfg_name, cfg in CONFIGS.items():
            if name == "pndm" and cfg.get("prediction_type") == "sample":
                continue  # diffusers' PNDM has no sample prediction
            yield name, cfg_name


@pytest.mark.parametrize("name,cfg_name", list(cases()))
@pytest.mark.parametrize("steps", STEPS)
def test_tables_match(name, cfg_name, steps):
    cfg = CONFIGS[cfg_name]
    ref = diffusers_scheduler(name, cfg)
    ours = make_scheduler(name, cfg)
    try:
        ref.set_timesteps(steps)
    except ValueError:  # diffusers' PNDM Runge-Kutta warm-up cannot run fewer than 4 steps
        with pytest.raises(ValueError, match="at least 4 steps"):
            ours.set_timesteps(steps)
        return
    ours.set_timesteps(steps)
    np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy().astype(np.float64), rtol=1e-6, atol=1e-3)
    np.testing.assert_allclose(ours.init_noise_sigma, float(ref.init_noise_sigma), rtol=RTOL)
    if hasattr(ref, "sigmas"):
        np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=RTOL, atol=1e-6)


@pytest.mark.parametrize("name,cfg_name", list(cases()))
@pytest.mark.parametrize("steps", [4, 7, 25])
def test_trajectory_matches(name, cfg_name, steps):
    cfg = CONFIGS[cfg_name]
    ref = diffusers_scheduler(name, cfg)
    ours = make_scheduler(name, cfg)
    ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    rng = np.random.default_rng(0)
    x_ref = rng.standard_normal((2, 4, 5, 3)) * ours.init_noise_sigma
    x_ours = x_ref.copy()
    for i, t in enumerate(ref.timesteps):
        fixed = rng.standard_normal(x_ref.shape)
        ref_in = ref.scale_model_input(torch.from_numpy(x_ref), t).numpy()
        ours_in = ours.scale_model_input(x_ours, i)
        np.testing.assert_allclose(ours_in, ref_in, rtol=RTOL, atol=1e-5)
        out = 0.3 * ref_in + fixed  # a model output that depends on its input
        x_ref = ref.step(torch.from_numpy(out), t, torch.from_numpy(x_ref)).prev_sample.numpy()
        x_ours = ours.step(0.3 * ours_in + fixed, i, x_ours)
        np.testing.assert_allclose(x_ours, x_ref, rtol=RTOL, atol=1e-5, err_msg=f"step {i} (t={t})")


@pytest.mark.parametrize("name", list(CLASSES))
def test_rerunning_a_schedule_starts_fresh(name):
    ours = make_scheduler(name, CONFIGS["sd15"])
    ours.set_timesteps(5)

    def run():
        x = np.ones((1, 4, 2, 2))
        for i in range(len(ours.timesteps)):
            x = ours.step(0.1 * ours.scale_model_input(x, i), i, x)
        return x

    np.testing.assert_array_equal(run(), run())


def test_pndm_runge_kutta_warmup_matches():
    cfg = {**CONFIGS["sd15"], "skip_prk_steps": False}
    ref = diffusers_scheduler("pndm", cfg)
    ours = make_scheduler("pndm", cfg)
    ref.set_timesteps(10)
    ours.set_timesteps(10)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    rng = np.random.default_rng(1)
    x_ref = rng.standard_normal((1, 4, 3, 3))
    x_ours = x_ref.copy()
    for i, t in enumerate(ref.timesteps):
        out = 0.2 * x_ref + rng.standard_normal(x_ref.shape)
        x_ref = ref.step(torch.from_numpy(out), t, torch.from_numpy(x_ref)).prev_sample.numpy()
        x_ours = ours.step(out, i, x_ours)
        np.testing.assert_allclose(x_ours, x_ref, rtol=RTOL, atol=1e-5)


def test_overrides_and_karras_sigmas():
    ref = diffusers_scheduler("euler", CONFIGS["sd15"], use_karras_sigmas=True)
    ours = make_scheduler("euler", CONFIGS["sd15"], use_karras_sigmas=True)
    ref.set_timesteps(12)
    ours.set_timesteps(12)
    np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=RTOL)
    np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), rtol=1e-4, atol=1e-3)


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="valid names: .*ddim"):
        make_scheduler("dpm_superfast", CONFIGS["sd15"])


def test_unknown_override_is_rejected():
    with pytest.raises(TypeError, match="unknown option"):
        make_scheduler("ddim", CONFIGS["sd15"], use_magic=True)


def test_bad_step_counts():
    s = make_scheduler("ddim", CONFIGS["sd15"])
    for bad in (0, -3, 2.5, 1001):
        with pytest.raises(ValueError):
            s.set_timesteps(bad)


def test_bad_config_values():
    with pytest.raises(ValueError, match="beta_schedule"):
        make_scheduler("ddim", {**CONFIGS["sd15"], "beta_schedule": "wobbly"})
    with pytest.raises(ValueError, match="prediction_type"):
        make_scheduler("pndm", {**CONFIGS["sd15"], "prediction_type": "sample"})


def test_default_scheduler_follows_model():
    assert default_scheduler_name(CONFIGS["sd15"]) == "pndm"
    assert default_scheduler_name(CONFIGS["sd2-v"]) == "ddim"
    assert set(CLASSES) <= set(SCHEDULER_NAMES)


def test_works_on_mlx_arrays():
    import mlx.core as mx

    s = make_scheduler("ddim", CONFIGS["cosine-sample"])  # clip_sample exercises the array helper
    s.set_timesteps(4)
    x = np.random.default_rng(0).standard_normal((1, 2, 2, 4)).astype(np.float32)
    a = s.step(x * 0.5, 1, x)
    b = s.step(mx.array(x * 0.5), 1, mx.array(x))
    np.testing.assert_allclose(np.asarray(b), a, rtol=1e-5, atol=1e-6)
