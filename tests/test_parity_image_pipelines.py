"""Image-to-image and inpainting against diffusers' pipelines, fed the same noise and the posterior mean.

Every listed sampler runs on MLX; a representative pair (second-order and multistep) on torch too. Each
diffusers reference is computed once and compared against both backends.
"""

import importlib

import numpy as np
import pytest
import torch
from helpers import diffusers_pipeline, diffusers_scheduler_for, max_abs_error, report
from PIL import Image

from mlx_stablefused import ImageToImageDiffusion, InpaintDiffusion, TextToImageDiffusion
from mlx_stablefused.backends.base import as_numpy

PROMPTS = ["a photo of the cat", "an astronaut riding a horse"]
NEGATIVES = ["blurry", ""]


def make_image(w=64, h=64, seed=0):
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, w * h * 3).reshape(h, w, 3)
    return Image.fromarray(((base + rng.uniform(0, 60, (h, w, 3))) % 256).astype(np.uint8))


def make_mask(w=64, h=64):
    m = np.zeros((h, w), np.uint8)
    m[h // 4: 3 * h // 4, w // 8: w // 2] = 255
    m[5:9, -20:] = 200
    return Image.fromarray(m)


def run_diffusers(pipe, noise, **kwargs):
    """diffusers encodes with a posterior *sample*; use the mean as we do. Feed it our noise."""
    module = importlib.import_module(type(pipe).__module__)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(module, "retrieve_latents", lambda enc, generator=None, sample_mode="sample": enc.latent_dist.mode())
        mp.setattr(module, "randn_tensor", lambda *a, **k: torch.from_numpy(noise))
        with torch.no_grad():
            return pipe(output_type="np", **kwargs).images


def cases(all_cases, on_torch):
    """(case, backend) pairs: every case on MLX; on torch the representative ones, the rest under -m slow
    (the samplers are backend-neutral code, checked on MLX)."""
    return pytest.mark.parametrize("case,backend", [
        pytest.param(case, backend, id=f"{backend}-{case[0]}-{case[1]}",
                     marks=pytest.mark.slow if backend == "torch" and case not in on_torch else ())
        for backend in ("mlx", "torch") for case in all_cases])


@pytest.fixture(scope="module")
def references():
    """(pipeline, model folder, case) -> diffusers' images, computed once for both backends."""
    return {}


IMG2IMG = [("ddim", 2), ("pndm", 1), ("euler", 2), ("heun", 1), ("dpm_multistep", 3)]  # (sampler, start step)


@cases(IMG2IMG, [("heun", 1), ("dpm_multistep", 3)])
def test_image_to_image_matches_diffusers(tiny, case, backend, references, pipelines):
    (scheduler, start_step), steps = case, 5
    pipe, root = tiny
    noise = np.random.default_rng(3).standard_normal((2, 4, 8, 8)).astype(np.float32)
    key = ("img2img", str(root), case)
    if key not in references:
        ref = diffusers_pipeline(pipe, "StableDiffusionImg2ImgPipeline", diffusers_scheduler_for(root, scheduler))
        references[key] = run_diffusers(ref, noise, prompt=PROMPTS, negative_prompt=NEGATIVES, image=make_image(),
                                        strength=(steps - start_step) / steps, num_inference_steps=steps,
                                        guidance_scale=7.5)
    ours = pipelines.pipeline(ImageToImageDiffusion, root, backend, scheduler=scheduler)
    got = ours(make_image(), PROMPTS, num_inference_steps=steps, start_step=start_step, negative_prompt=NEGATIVES,
               noise=noise, output_type="np")
    assert report(f"image-to-image vs StableDiffusionImg2ImgPipeline (max abs) [{backend}]",
                  max_abs_error(got, references[key])) < 5e-3


NINE_CHANNEL = [("ddim", 1.0), ("ddim", 0.6), ("euler", 0.6), ("pndm", 1.0)]  # (sampler, strength)


@cases(NINE_CHANNEL, [("ddim", 0.6), ("pndm", 1.0)])
def test_nine_channel_inpainting_matches_diffusers(sd1_inpaint, case, backend, references, pipelines):
    (scheduler, strength), steps = case, 5
    pipe, root = sd1_inpaint
    image, mask = make_image(64, 48), make_mask(64, 48)
    noise = np.random.default_rng(4).standard_normal((2, 4, 6, 8)).astype(np.float32)
    key = ("nine-channel", str(root), case)
    if key not in references:
        ref = diffusers_pipeline(pipe, scheduler=diffusers_scheduler_for(root, scheduler))
        references[key] = run_diffusers(ref, noise, prompt=PROMPTS, negative_prompt=NEGATIVES, image=image,
                                        mask_image=mask, height=48, width=64, strength=strength,
                                        num_inference_steps=steps, guidance_scale=7.5)
    ours = pipelines.pipeline(InpaintDiffusion, root, backend, scheduler=scheduler)
    got = ours(PROMPTS, image, mask, num_inference_steps=steps, strength=strength, negative_prompt=NEGATIVES,
               noise=noise, output_type="np")
    assert got.shape == (2, 48, 64, 3)
    assert report(f"9-channel inpainting vs StableDiffusionInpaintPipeline (max abs) [{backend}]",
                  max_abs_error(got, references[key])) < 5e-3


BLENDING = [("ddim", 1.0), ("ddim", 0.6), ("euler", 0.8), ("heun", 1.0), ("dpm_multistep", 0.6)]  # (sampler, strength)


@cases(BLENDING, [("heun", 1.0), ("dpm_multistep", 0.6)])
def test_latent_blending_inpainting_matches_diffusers(tiny, case, backend, references, pipelines):
    scheduler, strength = case
    pipe, root = tiny
    image, mask = make_image(), make_mask()
    noise = np.random.default_rng(5).standard_normal((1, 4, 8, 8)).astype(np.float32)
    key = ("blending", str(root), case)
    if key not in references:
        ref = diffusers_pipeline(pipe, "StableDiffusionInpaintPipeline", diffusers_scheduler_for(root, scheduler))
        references[key] = run_diffusers(ref, noise, prompt="the cat", image=image, mask_image=mask, height=64,
                                        width=64, strength=strength, num_inference_steps=5, guidance_scale=7.5)
    ours = pipelines.pipeline(InpaintDiffusion, root, backend, scheduler=scheduler)
    got = ours("the cat", image, mask, num_inference_steps=5, strength=strength, noise=noise, output_type="np")
    assert report(f"latent-blending inpainting vs StableDiffusionInpaintPipeline (max abs) [{backend}]",
                  max_abs_error(got, references[key])) < 5e-3


def test_strength_equals_start_step(sd1, pipelines):
    _, root = sd1
    ours = pipelines.pipeline(ImageToImageDiffusion, root, scheduler="ddim")
    args = dict(image=make_image(), prompt="x", num_inference_steps=10, seed=3, output_type="np")
    np.testing.assert_array_equal(ours(start_step=3, **args), ours(strength=0.7, **args))


def test_blending_keeps_the_unmasked_latent(sd1, pipelines):
    """With latent blending the final latent equals the image latent wherever the mask is black."""
    _, root = sd1
    ours = pipelines.pipeline(InpaintDiffusion, root, scheduler="ddim")
    image, mask = make_image(), make_mask()
    lat = ours("x", image, mask, num_inference_steps=4, seed=0, output_type="latent")
    ref = as_numpy(ours.image_to_latent(image))
    keep = (np.asarray(mask)[::8, ::8] < 128)[None, None]
    np.testing.assert_allclose(np.where(keep, lat, 0), np.where(keep, ref, 0), atol=1e-5)
    assert np.abs(np.where(~keep, lat - ref, 0)).max() > 1e-2


def test_components_are_shared_not_reloaded(sd1, pipelines):
    _, root = sd1
    t2i = pipelines.pipeline(TextToImageDiffusion, root)
    t2i.set_scheduler("euler", use_karras_sigmas=True)
    i2i = ImageToImageDiffusion.from_pipeline(t2i)
    inpaint = InpaintDiffusion(components=t2i.components, progress=False)
    assert i2i.backend is t2i.backend and inpaint.backend is t2i.backend
    assert i2i.scheduler is not t2i.scheduler and i2i.scheduler.config["use_karras_sigmas"]
    with pytest.raises(ValueError, match="exactly one"):
        InpaintDiffusion(root, components=t2i.components)


@pytest.mark.parametrize("kw,error,match", [
    (dict(start_step=5), ValueError, "start_step"),
    (dict(start_step=-1), ValueError, "start_step"),
    (dict(strength=1.5), ValueError, "strength"),
    (dict(strength=0.01), ValueError, "no denoising step"),
    (dict(start_step=1, strength=0.5), ValueError, "not both"),
    (dict(image_height=64), ValueError, "both image_height and image_width"),
])
def test_image_to_image_bad_arguments(sd1, pipelines, kw, error, match):
    _, root = sd1
    ours = pipelines.pipeline(ImageToImageDiffusion, root)
    with pytest.raises(error, match=match):
        ours(make_image(), "x", num_inference_steps=5, **kw)


def test_image_inputs_and_errors(sd1, pipelines, tmp_path):
    _, root = sd1
    ours = pipelines.pipeline(ImageToImageDiffusion, root)
    args = dict(num_inference_steps=2, start_step=1, seed=0, output_type="np")
    img = make_image()
    path = tmp_path / "in.png"
    img.save(path)
    a = ours(img, "x", **args)
    np.testing.assert_allclose(ours(str(path), "x", **args), a, atol=1e-6)
    np.testing.assert_allclose(ours(np.asarray(img), "x", **args), a, atol=1e-6)
    np.testing.assert_allclose(ours(np.asarray(img) / 255.0, "x", **args), a, atol=1e-5)
    assert ours(make_image(60, 52), "x", image_height=64, image_width=48, **args).shape == (1, 64, 48, 3)
    with pytest.raises(ValueError, match="multiples of 8"):
        ours(make_image(60, 52), "x", **args)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="could not read image"):
        ours(str(tmp_path / "bad.png"), "x", **args)
    with pytest.raises(FileNotFoundError):
        ours(str(tmp_path / "missing.png"), "x", **args)
    with pytest.raises(ValueError, match="2 images for 3 prompts"):
        ours([img, img], ["a", "b", "c"], **args)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ours(np.asarray(img) * 2.0, "x", **args)


def test_inpaint_bad_inputs(sd1, pipelines):
    from mlx_stablefused import UnsupportedModelError

    _, root = sd1
    ours = pipelines.pipeline(InpaintDiffusion, root)
    with pytest.raises(ValueError, match="mask is 32x32 but the image is 64x64"):
        ours("x", make_image(), make_mask(32, 32), num_inference_steps=2)
    with pytest.raises(UnsupportedModelError, match="9-channel"):
        ours("x", make_image(), make_mask(), num_inference_steps=2, mode="unet")
    with pytest.raises(ValueError, match="unknown inpainting mode"):
        ours("x", make_image(), make_mask(), num_inference_steps=2, mode="magic")
    resized = ours("x", make_image(70, 60), make_mask(35, 30), image_height=48, image_width=64,
                   num_inference_steps=2, seed=0, output_type="np")
    assert resized.shape == (1, 48, 64, 3)


def test_vae_tiling_matches_diffusers(sd1, pipelines, backend_name, monkeypatch):
    """Tiled decode and encode against diffusers' AutoencoderKL tiling (tiny VAE: 32 px tiles)."""
    pipe, root = sd1
    ours = pipelines.pipeline(TextToImageDiffusion, root, backend_name)
    vae = pipe.vae  # the session's: every change below is undone by monkeypatch
    assert vae.config.sample_size == 64
    monkeypatch.setattr(vae, "tile_sample_min_size", 32)  # small tiles so a small image has many
    monkeypatch.setattr(vae, "tile_latent_min_size", 4)
    monkeypatch.setattr(vae, "use_tiling", True)
    ours.enable_tiling(tile_size=32)
    z = np.random.default_rng(6).standard_normal((1, 4, 11, 9)).astype(np.float32)
    with torch.no_grad():
        ref = vae.decode(torch.from_numpy(z) / vae.config.scaling_factor).sample.numpy()
    got = ours.latent_to_image(z, output_type="np")
    ref_img = np.clip(ref.transpose(0, 2, 3, 1) / 2 + 0.5, 0, 1)
    assert report(f"tiled VAE decode vs diffusers (max abs) [{backend_name}]", max_abs_error(got, ref_img)) < 5e-4
    image = make_image(72, 88)
    pixels = np.asarray(image, np.float32)[None] / 255.0
    with torch.no_grad():
        ref_mean = vae.encode(torch.from_numpy(pixels.transpose(0, 3, 1, 2) * 2 - 1)).latent_dist.mean.numpy()
    mean = as_numpy(ours.image_to_latent(image)) / vae.config.scaling_factor
    assert report(f"tiled VAE encode vs diffusers (max abs) [{backend_name}]", max_abs_error(mean, ref_mean)) < 5e-4


def test_slicing_and_attention_chunking_change_nothing(sd1, pipelines):
    _, root = sd1
    ours = pipelines.pipeline(TextToImageDiffusion, root, scheduler="ddim")
    args = dict(prompt=["a", "b"], num_inference_steps=2, seed=1, image_height=64, image_width=64, output_type="np")
    plain = ours(**args)
    ours.enable_slicing()
    ours.enable_attention_slicing(7)  # backend-wide: undone below for the other tests sharing the model
    try:
        np.testing.assert_allclose(ours(**args), plain, atol=1e-5)
    finally:
        ours.disable_attention_slicing()
