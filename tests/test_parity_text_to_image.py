"""End-to-end text-to-image parity with diffusers' StableDiffusionPipeline on tiny random models.

Every sampler runs end to end on MLX against diffusers, on both tiny configurations (epsilon and
v-prediction); a representative set (the README's DDIM / PNDM / Euler, multistep, ancestral, SDE with
noise) runs on torch as well. The diffusers reference and each backend's image are computed once and
shared by the checks that compare them (diffusers, and MLX against torch at the same seed).
"""

import importlib

import numpy as np
import pytest
import torch
from helpers import diffusers_pipeline, diffusers_scheduler_for, max_abs_error, rel_error, report

from mlx_stablefused import SCHEDULER_NAMES, TextToImageDiffusion
from mlx_stablefused.schedulers import make_scheduler
from mlx_stablefused.schedulers.brownian import SEED_BOUND, BrownianNoise, BrownianTree

PROMPTS = ["a photo of the cat", "an astronaut riding a horse"]
NEGATIVES = ["blurry", ""]
README_SAMPLERS = ("ddim", "pndm", "euler")  # the parity table's text-to-image row, on both backends
SAME_SEED_SAMPLERS = ("euler_ancestral", "dpm_sde_karras", "dpm_multistep", "ddpm")  # MLX vs torch, with noise
ON_BOTH_BACKENDS = README_SAMPLERS + SAME_SEED_SAMPLERS
SLOW = pytest.mark.slow  # the other samplers on torch: backend-neutral sampler code, already checked on MLX
CASES = ([pytest.param(name, "mlx", id=f"mlx-{name}") for name in SCHEDULER_NAMES]
         + [pytest.param(name, "torch", id=f"torch-{name}", marks=() if name in ON_BOTH_BACKENDS else SLOW)
            for name in SCHEDULER_NAMES])
RUN = dict(prompt=PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=4, guidance_scale=7.5)
NOISE_SEED = 5


def patch_diffusers_noise(monkeypatch, scheduler, seed, shape, ours=None):
    """Make diffusers' sampler draw the same Gaussian noise, in the same order, as our pipeline does; an
    SDE sampler reads the Brownian path our pipeline draws (its seed is the generator's first draw), at
    the sigmas of ``ours`` (our scheduler, timesteps set) that diffusers' float32 sigmas stand for."""
    rng = np.random.default_rng(seed)

    def draw(*args, **kwargs):
        return torch.from_numpy(rng.standard_normal(shape).astype(np.float32))

    module = importlib.import_module(type(scheduler).__module__)
    if hasattr(module, "randn_tensor"):
        monkeypatch.setattr(module, "randn_tensor", draw)
    if hasattr(module, "BrownianTreeNoiseSampler"):
        sigmas = np.concatenate([ours.step_sigmas, ours.mid_sigmas])
        positive = ours.step_sigmas[ours.step_sigmas > 0]
        path = BrownianNoise(BrownianTree(positive.min(), positive.max(), shape, int(rng.integers(0, SEED_BOUND))),
                             torch.from_numpy)

        def ours_at(s):
            return float(sigmas[np.argmin(np.abs(sigmas - float(s)))])

        monkeypatch.setattr(module, "BrownianTreeNoiseSampler",
                            lambda *a, **k: (lambda s, s_next: path(ours_at(s), ours_at(s_next))))


def initial_latents():
    return np.random.default_rng(7).standard_normal((2, 4, 8, 8)).astype(np.float32)


@pytest.fixture(scope="module")
def runs():
    """(model folder, sampler, "diffusers" or backend) -> the 4-step CFG image, computed once per module."""
    return {}


def reference_image(runs, tiny, scheduler):
    pipe, root = tiny
    key = (str(root), scheduler, "diffusers")
    if key not in runs:
        ref = diffusers_pipeline(pipe, scheduler=diffusers_scheduler_for(root, scheduler))
        with pytest.MonkeyPatch.context() as mp:
            ours = make_scheduler(scheduler, ref.scheduler.config)
            ours.set_timesteps(RUN["num_inference_steps"])
            patch_diffusers_noise(mp, ref.scheduler, seed=NOISE_SEED, shape=(2, 4, 8, 8), ours=ours)
            with torch.no_grad():
                runs[key] = ref(latents=torch.from_numpy(initial_latents()), height=64, width=64, output_type="np",
                                **RUN).images
    return runs[key]


def our_image(runs, pipelines, tiny, scheduler, backend):
    _, root = tiny
    key = (str(root), scheduler, backend)
    if key not in runs:
        ours = pipelines.pipeline(TextToImageDiffusion, root, backend, scheduler=scheduler)
        runs[key] = ours(latent=initial_latents(), output_type="np", seed=NOISE_SEED, **RUN)
    return runs[key]


@pytest.mark.parametrize("scheduler,backend", CASES)
def test_every_sampler_end_to_end(tiny, scheduler, backend, runs, pipelines):
    """A 4-step CFG run (two prompts, two negatives) on SD1-style (epsilon) and SD2-style (v) models."""
    ref = reference_image(runs, tiny, scheduler)
    got = our_image(runs, pipelines, tiny, scheduler, backend)
    assert got.shape == ref.shape == (2, 64, 64, 3)
    name = (f"all samplers end to end (max abs, worst of {len(SCHEDULER_NAMES)}) [mlx]" if backend == "mlx" else
            f"samplers end to end, {len(ON_BOTH_BACKENDS)} by default, all with -m slow (max abs) [{backend}]")
    err = report(name, max_abs_error(got, ref))
    if scheduler in README_SAMPLERS:
        report(f"text-to-image {scheduler} (max abs, [0,1] image) [{backend}]", err)
    assert err < 5e-3, scheduler


@pytest.mark.parametrize("scheduler", SAME_SEED_SAMPLERS)
def test_same_seed_same_image_on_both_backends(tiny, scheduler, runs, pipelines):
    """The same latent and seed give the same image on MLX and torch, stochastic samplers included."""
    mlx_image, torch_image = (our_image(runs, pipelines, tiny, scheduler, b) for b in ("mlx", "torch"))
    assert report("MLX vs torch, text-to-image, same seed (max abs)", max_abs_error(mlx_image, torch_image)) < 5e-3


def reference(tiny, scheduler, latents, **kwargs):
    """diffusers' StableDiffusionPipeline (a new object on the session's modules) from ``latents``."""
    pipe, root = tiny
    ref = diffusers_pipeline(pipe, scheduler=diffusers_scheduler_for(root, scheduler))
    with torch.no_grad():
        return ref(latents=torch.from_numpy(latents), output_type="np", **kwargs).images


def test_odd_latent_size_and_guidance_rescale(sd2, pipelines, backend_name):
    _, root = sd2
    ours = pipelines.pipeline(TextToImageDiffusion, root, backend_name, scheduler="ddim")
    latents = np.random.default_rng(8).standard_normal((1, 4, 9, 7)).astype(np.float32)
    args = dict(prompt="the end", num_inference_steps=3, guidance_scale=5.0, guidance_rescale=0.7)
    ref = reference(sd2, "ddim", latents, height=72, width=56, **args)
    got = ours(latent=latents, output_type="np", **args)
    assert report(f"text-to-image odd size + rescale (max abs) [{backend_name}]", max_abs_error(got, ref)) < 5e-3


def test_prompt_embedding_matches_diffusers(tiny, pipelines, backend_name):
    pipe, root = tiny
    ours = pipelines.pipeline(TextToImageDiffusion, root, backend_name)
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=NEGATIVES)
    emb = ours.backend.to_numpy(ours.prompt_to_embedding(PROMPTS, NEGATIVES))
    assert emb.shape == (4, 77, 32)
    assert report("prompt_to_embedding vs encode_prompt (rel)", rel_error(emb, torch.cat([uncond, cond]).numpy())) < 1e-4


def test_guidance_scale_one_skips_unconditional_pass(sd1, pipelines):
    """diffusers disables CFG at scale <= 1; at exactly 1 both must agree."""
    _, root = sd1
    ours = pipelines.pipeline(TextToImageDiffusion, root, scheduler="ddim")
    latents = np.random.default_rng(9).standard_normal((1, 4, 8, 8)).astype(np.float32)
    args = dict(prompt="the cat", num_inference_steps=3, guidance_scale=1.0)
    ref = reference(sd1, "ddim", latents, height=64, width=64, **args)
    assert max_abs_error(ours(latent=latents, output_type="np", **args), ref) < 5e-3


def test_latent_output_and_history_shapes(sd1, pipelines):
    _, root = sd1
    ours = pipelines.pipeline(TextToImageDiffusion, root, scheduler="ddim")
    args = dict(prompt="the cat", num_inference_steps=3, seed=1, image_height=64, image_width=64)
    final = ours(output_type="latent", **args)
    hist = ours(output_type="latent", return_latent_history=True, **args)
    assert final.shape == (1, 4, 8, 8) and hist.shape == (1, 4, 4, 8, 8)
    np.testing.assert_allclose(hist[:, -1], final, atol=1e-6)
    frames = ours(output_type="pil", return_latent_history=True, **args)
    assert len(frames) == 1 and len(frames[0]) == 4 and frames[0][0].size == (64, 64)


def test_seed_is_deterministic_and_matches_numpy_draw(sd1, pipelines):
    _, root = sd1
    ours = pipelines.pipeline(TextToImageDiffusion, root, scheduler="euler")
    a = ours("the cat", num_inference_steps=2, seed=123, image_height=64, image_width=64, output_type="np")
    b = ours("the cat", num_inference_steps=2, seed=123, image_height=64, image_width=64, output_type="np")
    noise = np.random.default_rng(123).standard_normal((1, 4, 8, 8)).astype(np.float32)
    c = ours("the cat", num_inference_steps=2, latent=noise, output_type="np")
    d = ours("the cat", num_inference_steps=2, seed=124, image_height=64, image_width=64, output_type="np")
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, c, atol=1e-6)
    assert np.abs(a - d).max() > 1e-3


def test_native_output_and_bfloat16(sd1, pipelines):
    import mlx.core as mx

    _, root = sd1
    ours = pipelines.pipeline(TextToImageDiffusion, root, scheduler="ddim")
    args = dict(prompt="the cat", num_inference_steps=3, seed=5, image_height=64, image_width=64)
    native = ours(output_type="mlx", **args)
    assert isinstance(native, mx.array) and native.shape == (1, 64, 64, 3)
    ref = ours(output_type="np", **args)
    np.testing.assert_allclose(np.asarray(native), ref, atol=1e-6)
    bf16 = pipelines.pipeline(TextToImageDiffusion, root, scheduler="ddim", dtype="bfloat16")
    assert bf16.backend.unet_model.conv_in.weight.dtype == mx.bfloat16
    assert np.abs(bf16(output_type="np", **args) - ref).max() < 0.1  # bf16 has 8 bits of mantissa


def test_zero_and_negative_guidance(sd1, pipelines):
    """g = 0 is the unconditional prediction: the same as the negative prompt alone at g = 1."""
    _, root = sd1
    ours = pipelines.pipeline(TextToImageDiffusion, root, scheduler="ddim")
    args = dict(num_inference_steps=3, seed=2, image_height=64, image_width=64, output_type="np")
    zero = ours("a photo of the cat", negative_prompt="blurry", guidance_scale=0.0, **args)
    plain = ours("blurry", guidance_scale=1.0, **args)
    np.testing.assert_allclose(zero, plain, atol=1e-5)
    negative = ours("a photo of the cat", negative_prompt="blurry", guidance_scale=-1.5, **args)
    assert np.isfinite(negative).all() and np.abs(negative - zero).max() > 1e-3
