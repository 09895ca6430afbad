"""End-to-end text-to-image parity with diffusers' StableDiffusionPipeline on tiny random models."""

import numpy as np
import pytest
import torch
from conftest import rel_error, report

from mlx_stablefused import SCHEDULER_NAMES, TextToImageDiffusion

DIFFUSERS_CLASSES = {"ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "euler": "EulerDiscreteScheduler"}
PROMPTS = ["a photo of the cat", "an astronaut riding a horse"]
NEGATIVES = ["blurry", ""]


def reference(pipe, root, scheduler_name, latents, **kwargs):
    import diffusers

    cls = getattr(diffusers, DIFFUSERS_CLASSES[scheduler_name])
    pipe.scheduler = cls.from_pretrained(str(root), subfolder="scheduler")
    with torch.no_grad():
        return pipe(latents=torch.from_numpy(latents), output_type="np", **kwargs).images


@pytest.fixture(scope="module")
def ours_cache():
    return {}


def load_ours(root, cache, backend="mlx"):
    if (root, backend) not in cache:
        cache[(root, backend)] = TextToImageDiffusion(model_id=root, progress=False, backend=backend)
    return cache[(root, backend)]


@pytest.mark.parametrize("scheduler", ["ddim", "pndm", "euler"])
def test_text_to_image_matches_diffusers(tiny, scheduler, ours_cache, backend_name):
    pipe, root = tiny
    ours = load_ours(root, ours_cache, backend_name)
    ours.set_scheduler(scheduler)
    latents = np.random.default_rng(7).standard_normal((2, 4, 8, 8)).astype(np.float32)
    args = dict(prompt=PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=4, guidance_scale=7.5)
    ref = reference(pipe, root, scheduler, latents, height=64, width=64, **args)
    got = ours(latent=latents, output_type="np", **args)
    assert got.shape == ref.shape == (2, 64, 64, 3)
    assert report(f"text-to-image {scheduler} (max abs, [0,1] image) [{backend_name}]",
                  np.abs(got - ref).max()) < 5e-3


def test_odd_latent_size_and_guidance_rescale(sd2, ours_cache, backend_name):
    pipe, root = sd2
    ours = load_ours(root, ours_cache, backend_name)
    ours.set_scheduler("ddim")
    latents = np.random.default_rng(8).standard_normal((1, 4, 9, 7)).astype(np.float32)
    args = dict(prompt="the end", num_inference_steps=3, guidance_scale=5.0, guidance_rescale=0.7)
    ref = reference(pipe, root, "ddim", latents, height=72, width=56, **args)
    got = ours(latent=latents, output_type="np", **args)
    assert report(f"text-to-image odd size + rescale (max abs) [{backend_name}]", np.abs(got - ref).max()) < 5e-3


def test_prompt_embedding_matches_diffusers(tiny, ours_cache, backend_name):
    pipe, root = tiny
    ours = load_ours(root, ours_cache, backend_name)
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=NEGATIVES)
    emb = ours.backend.to_numpy(ours.prompt_to_embedding(PROMPTS, NEGATIVES))
    assert emb.shape == (4, 77, 32)
    assert report("prompt_to_embedding vs encode_prompt (rel)", rel_error(emb, torch.cat([uncond, cond]).numpy())) < 1e-4


def test_guidance_scale_one_skips_unconditional_pass(sd1, ours_cache):
    """diffusers disables CFG at scale <= 1; at exactly 1 both must agree."""
    pipe, root = sd1
    ours = load_ours(root, ours_cache)
    ours.set_scheduler("ddim")
    latents = np.random.default_rng(9).standard_normal((1, 4, 8, 8)).astype(np.float32)
    args = dict(prompt="the cat", num_inference_steps=3, guidance_scale=1.0)
    ref = reference(pipe, root, "ddim", latents, height=64, width=64, **args)
    assert np.abs(ours(latent=latents, output_type="np", **args) - ref).max() < 5e-3


def test_latent_output_and_history_shapes(sd1, ours_cache):
    _, root = sd1
    ours = load_ours(root, ours_cache)
    ours.set_scheduler("ddim")
    final = ours("the cat", num_inference_steps=3, seed=1, image_height=64, image_width=64, output_type="latent")
    hist = ours("the cat", num_inference_steps=3, seed=1, image_height=64, image_width=64, output_type="latent",
                return_latent_history=True)
    assert final.shape == (1, 4, 8, 8) and hist.shape == (1, 4, 4, 8, 8)
    np.testing.assert_allclose(hist[:, -1], final, atol=1e-6)
    frames = ours("the cat", num_inference_steps=3, seed=1, image_height=64, image_width=64, output_type="pil",
                  return_latent_history=True)
    assert len(frames) == 1 and len(frames[0]) == 4 and frames[0][0].size == (64, 64)


def test_seed_is_deterministic_and_matches_numpy_draw(sd1, ours_cache):
    _, root = sd1
    ours = load_ours(root, ours_cache)
    ours.set_scheduler("euler")
    a = ours("the cat", num_inference_steps=2, seed=123, image_height=64, image_width=64, output_type="np")
    b = ours("the cat", num_inference_steps=2, seed=123, image_height=64, image_width=64, output_type="np")
    noise = np.random.default_rng(123).standard_normal((1, 4, 8, 8)).astype(np.float32)
    c = ours("the cat", num_inference_steps=2, latent=noise, output_type="np")
    d = ours("the cat", num_inference_steps=2, seed=124, image_height=64, image_width=64, output_type="np")
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, c, atol=1e-6)
    assert np.abs(a - d).max() > 1e-3


def test_native_output_and_bfloat16(sd1, ours_cache):
    import mlx.core as mx

    _, root = sd1
    ours = load_ours(root, ours_cache)
    ours.set_scheduler("ddim")
    args = dict(prompt="the cat", num_inference_steps=3, seed=5, image_height=64, image_width=64)
    native = ours(output_type="mlx", **args)
    assert isinstance(native, mx.array) and native.shape == (1, 64, 64, 3)
    ref = ours(output_type="np", **args)
    np.testing.assert_allclose(np.asarray(native), ref, atol=1e-6)
    bf16 = TextToImageDiffusion(root, dtype="bfloat16", progress=False)
    assert bf16.backend.unet_model.conv_in.weight.dtype == mx.bfloat16
    assert np.abs(bf16(output_type="np", **args) - ref).max() < 0.1  # bf16 has 8 bits of mantissa


def _patch_diffusers_noise(monkeypatch, scheduler, seed, shape):
    """Make diffusers' sampler draw the same Gaussian noise, in the same order, as our pipeline does."""
    import importlib

    rng = np.random.default_rng(seed)

    def draw(*args, **kwargs):
        return torch.from_numpy(rng.standard_normal(shape).astype(np.float32))

    module = importlib.import_module(type(scheduler).__module__)
    if hasattr(module, "randn_tensor"):
        monkeypatch.setattr(module, "randn_tensor", draw)
    if hasattr(module, "BrownianTreeNoiseSampler"):
        monkeypatch.setattr(module, "BrownianTreeNoiseSampler", lambda *a, **k: (lambda *b: draw()))


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_every_sampler_end_to_end(tiny, scheduler, ours_cache, monkeypatch, backend_name):
    """Each sampler in a 4-step CFG run on SD1-style (epsilon) and SD2-style (v) models vs diffusers."""
    import diffusers
    from test_schedulers import DIFFUSERS

    pipe, root = tiny
    ours = load_ours(root, ours_cache, backend_name)
    ours.set_scheduler(scheduler)
    cls_name, preset = DIFFUSERS[scheduler]
    config = diffusers.DDIMScheduler.load_config(str(root), subfolder="scheduler")
    pipe.scheduler = getattr(diffusers, cls_name).from_config(config, **preset)
    latents = np.random.default_rng(11).standard_normal((1, 4, 8, 8)).astype(np.float32)
    _patch_diffusers_noise(monkeypatch, pipe.scheduler, seed=5, shape=latents.shape)
    args = dict(prompt="a photo of the cat", negative_prompt="blurry", num_inference_steps=4, guidance_scale=6.0)
    with torch.no_grad():
        ref = pipe(latents=torch.from_numpy(latents), height=64, width=64, output_type="np", **args).images
    got = ours(latent=latents, output_type="np", seed=5, **args)
    err = np.abs(got - ref).max()
    assert report(f"all samplers end to end (max abs, worst of {len(SCHEDULER_NAMES)}) [{backend_name}]",
                  err) < 5e-3, scheduler


def test_zero_and_negative_guidance(sd1, ours_cache):
    """g = 0 is the unconditional prediction: the same as the negative prompt alone at g = 1."""
    _, root = sd1
    ours = load_ours(root, ours_cache)
    ours.set_scheduler("ddim")
    args = dict(num_inference_steps=3, seed=2, image_height=64, image_width=64, output_type="np")
    zero = ours("a photo of the cat", negative_prompt="blurry", guidance_scale=0.0, **args)
    plain = ours("blurry", guidance_scale=1.0, **args)
    np.testing.assert_allclose(zero, plain, atol=1e-5)
    negative = ours("a photo of the cat", negative_prompt="blurry", guidance_scale=-1.5, **args)
    assert np.isfinite(negative).all() and np.abs(negative - zero).max() > 1e-3
