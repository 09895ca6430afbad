"""Image-to-image and inpainting against diffusers' pipelines, fed the same noise and the posterior mean."""

import importlib

import numpy as np
import pytest
import torch
from conftest import report
from PIL import Image

from mlx_stablefused import ImageToImageDiffusion, InpaintDiffusion, TextToImageDiffusion

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


def patch_diffusers(monkeypatch, pipe, noise):
    """diffusers encodes with a posterior *sample*; use the mean as we do. Feed it our noise."""
    module = importlib.import_module(type(pipe).__module__)
    monkeypatch.setattr(module, "retrieve_latents",
                        lambda enc, generator=None, sample_mode="sample": enc.latent_dist.mode())
    monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: torch.from_numpy(noise))


def use_scheduler(pipe, root, name):
    import diffusers
    from test_schedulers import DIFFUSERS

    cls_name, preset = DIFFUSERS[name]
    config = diffusers.DDIMScheduler.load_config(str(root), subfolder="scheduler")
    pipe.scheduler = getattr(diffusers, cls_name).from_config(config, **preset)


@pytest.fixture(scope="module")
def loaded():
    return {}


def get(cls, root, loaded, backend="mlx"):
    key = (cls, root, backend)
    if key not in loaded:
        loaded[key] = cls(root, progress=False, backend=backend)
    return loaded[key]


@pytest.mark.parametrize("scheduler,start_step", [("ddim", 2), ("pndm", 1), ("euler", 2), ("heun", 1),
                                                  ("dpm_multistep", 3)])
def test_image_to_image_matches_diffusers(tiny, scheduler, start_step, loaded, monkeypatch, backend_name):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe, root = tiny
    ref = StableDiffusionImg2ImgPipeline(**pipe.components)
    ref.set_progress_bar_config(disable=True)
    use_scheduler(ref, root, scheduler)
    ours = get(ImageToImageDiffusion, root, loaded, backend_name)
    ours.set_scheduler(scheduler)
    image = make_image()
    steps = 5
    noise = np.random.default_rng(3).standard_normal((2, 4, 8, 8)).astype(np.float32)
    patch_diffusers(monkeypatch, ref, noise)
    with torch.no_grad():
        expected = ref(prompt=PROMPTS, negative_prompt=NEGATIVES, image=image, strength=(steps - start_step) / steps,
                       num_inference_steps=steps, guidance_scale=7.5, output_type="np").images
    got = ours(image, PROMPTS, num_inference_steps=steps, start_step=start_step, negative_prompt=NEGATIVES,
               noise=noise, output_type="np")
    assert report(f"image-to-image vs StableDiffusionImg2ImgPipeline (max abs) [{backend_name}]",
                  np.abs(got - expected).max()) < 5e-3


def test_strength_equals_start_step(sd1, loaded):
    _, root = sd1
    ours = get(ImageToImageDiffusion, root, loaded)
    ours.set_scheduler("ddim")
    args = dict(image=make_image(), prompt="x", num_inference_steps=10, seed=3, output_type="np")
    np.testing.assert_array_equal(ours(start_step=3, **args), ours(strength=0.7, **args))


@pytest.mark.parametrize("scheduler,strength", [("ddim", 1.0), ("ddim", 0.6), ("euler", 0.6), ("pndm", 1.0)])
def test_nine_channel_inpainting_matches_diffusers(sd1_inpaint, scheduler, strength, loaded, monkeypatch,
                                                  backend_name):
    pipe, root = sd1_inpaint
    use_scheduler(pipe, root, scheduler)
    ours = get(InpaintDiffusion, root, loaded, backend_name)
    ours.set_scheduler(scheduler)
    image, mask = make_image(64, 48), make_mask(64, 48)
    noise = np.random.default_rng(4).standard_normal((2, 4, 6, 8)).astype(np.float32)
    patch_diffusers(monkeypatch, pipe, noise)
    steps = 5
    with torch.no_grad():
        expected = pipe(prompt=PROMPTS, negative_prompt=NEGATIVES, image=image, mask_image=mask, height=48, width=64,
                        strength=strength, num_inference_steps=steps, guidance_scale=7.5, output_type="np").images
    got = ours(PROMPTS, image, mask, num_inference_steps=steps, strength=strength, negative_prompt=NEGATIVES,
               noise=noise, output_type="np")
    assert got.shape == (2, 48, 64, 3)
    assert report(f"9-channel inpainting vs StableDiffusionInpaintPipeline (max abs) [{backend_name}]",
                  np.abs(got - expected).max()) < 5e-3


@pytest.mark.parametrize("scheduler,strength", [("ddim", 1.0), ("ddim", 0.6), ("euler", 0.8), ("heun", 1.0),
                                                ("dpm_multistep", 0.6)])
def test_latent_blending_inpainting_matches_diffusers(tiny, scheduler, strength, loaded, monkeypatch, backend_name):
    from diffusers import StableDiffusionInpaintPipeline

    pipe, root = tiny
    ref = StableDiffusionInpaintPipeline(**pipe.components)
    ref.set_progress_bar_config(disable=True)
    use_scheduler(ref, root, scheduler)
    ours = get(InpaintDiffusion, root, loaded, backend_name)
    ours.set_scheduler(scheduler)
    image, mask = make_image(), make_mask()
    noise = np.random.default_rng(5).standard_normal((1, 4, 8, 8)).astype(np.float32)
    patch_diffusers(monkeypatch, ref, noise)
    with torch.no_grad():
        expected = ref(prompt="the cat", image=image, mask_image=mask, height=64, width=64, strength=strength,
                       num_inference_steps=5, guidance_scale=7.5, output_type="np").images
    got = ours("the cat", image, mask, num_inference_steps=5, strength=strength, noise=noise, output_type="np")
    assert report(f"latent-blending inpainting vs StableDiffusionInpaintPipeline (max abs) [{backend_name}]",
                  np.abs(got - expected).max()) < 5e-3


def test_blending_keeps_the_unmasked_latent(sd1, loaded):
    """With latent blending the final latent equals the image latent wherever the mask is black."""
    _, root = sd1
    ours = get(InpaintDiffusion, root, loaded)
    ours.set_scheduler("ddim")
    image, mask = make_image(), make_mask()
    lat = ours("x", image, mask, num_inference_steps=4, seed=0, output_type="latent")
    ref = ours.backend.latent_to_numpy(ours.image_to_latent(image))
    keep = (np.asarray(mask)[::8, ::8] < 128)[None, None]
    np.testing.assert_allclose(np.where(keep, lat, 0), np.where(keep, ref, 0), atol=1e-5)
    assert np.abs(np.where(~keep, lat - ref, 0)).max() > 1e-2


def test_components_are_shared_not_reloaded(sd1):
    _, root = sd1
    t2i = TextToImageDiffusion(root, progress=False)
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
def test_image_to_image_bad_arguments(sd1, loaded, kw, error, match):
    _, root = sd1
    ours = get(ImageToImageDiffusion, root, loaded)
    with pytest.raises(error, match=match):
        ours(make_image(), "x", num_inference_steps=5, **kw)


def test_image_inputs_and_errors(sd1, loaded, tmp_path):
    _, root = sd1
    ours = get(ImageToImageDiffusion, root, loaded)
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


def test_inpaint_bad_inputs(sd1, sd1_inpaint, loaded):
    from mlx_stablefused import UnsupportedModelError

    _, root = sd1
    ours = get(InpaintDiffusion, root, loaded)
    with pytest.raises(ValueError, match="mask is 32x32 but the image is 64x64"):
        ours("x", make_image(), make_mask(32, 32), num_inference_steps=2)
    with pytest.raises(UnsupportedModelError, match="9-channel"):
        ours("x", make_image(), make_mask(), num_inference_steps=2, mode="unet")
    with pytest.raises(ValueError, match="unknown inpainting mode"):
        ours("x", make_image(), make_mask(), num_inference_steps=2, mode="magic")
    resized = ours("x", make_image(70, 60), make_mask(35, 30), image_height=48, image_width=64,
                   num_inference_steps=2, seed=0, output_type="np")
    assert resized.shape == (1, 48, 64, 3)


def test_vae_tiling_matches_diffusers(sd1, loaded, backend_name):
    """Tiled decode and encode against diffusers' AutoencoderKL tiling (tiny VAE: 32 px tiles)."""
    pipe, root = sd1
    ours = get(TextToImageDiffusion, root, loaded, backend_name)
    vae = pipe.vae
    assert vae.config.sample_size == 64
    vae.tile_sample_min_size, vae.tile_latent_min_size = 32, 4  # small tiles so a small image has many
    vae.enable_tiling()
    ours.enable_tiling(tile_size=32)
    try:
        z = np.random.default_rng(6).standard_normal((1, 4, 11, 9)).astype(np.float32)
        with torch.no_grad():
            ref = vae.decode(torch.from_numpy(z) / vae.config.scaling_factor).sample.numpy()
        got = ours.latent_to_image(z, output_type="np")
        ref_img = np.clip(ref.transpose(0, 2, 3, 1) / 2 + 0.5, 0, 1)
        assert report(f"tiled VAE decode vs diffusers (max abs) [{backend_name}]", np.abs(got - ref_img).max()) < 5e-4
        image = make_image(72, 88)
        pixels = np.asarray(image, np.float32)[None] / 255.0
        with torch.no_grad():
            ref_mean = vae.encode(torch.from_numpy(pixels.transpose(0, 3, 1, 2) * 2 - 1)).latent_dist.mean.numpy()
        mean = ours.backend.latent_to_numpy(ours.image_to_latent(image)) / vae.config.scaling_factor
        assert report(f"tiled VAE encode vs diffusers (max abs) [{backend_name}]", np.abs(mean - ref_mean).max()) < 5e-4
    finally:
        vae.disable_tiling()
        ours.disable_tiling()


def test_slicing_and_attention_chunking_change_nothing(sd1, loaded):
    _, root = sd1
    ours = get(TextToImageDiffusion, root, loaded)
    ours.set_scheduler("ddim")
    args = dict(prompt=["a", "b"], num_inference_steps=2, seed=1, image_height=64, image_width=64, output_type="np")
    plain = ours(**args)
    ours.enable_slicing()
    ours.enable_attention_slicing(7)
    try:
        np.testing.assert_allclose(ours(**args), plain, atol=1e-5)
    finally:
        ours.disable_slicing()
        ours.disable_attention_slicing()
