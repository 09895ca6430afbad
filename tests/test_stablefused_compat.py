"""stablefused 0.2.0 as a drop-in: the three calls that crashed (regressions), and stablefused's own tests
re-expressed with only the import and the tiny model changed, on both backends."""

import numpy as np
import pytest
import torch
from helpers import max_abs_error, report

from mlx_stablefused import LatentWalkDiffusion, TextToImageDiffusion


def native_type(backend_name):
    import mlx.core as mx

    return mx.array if backend_name == "mlx" else torch.Tensor


# ------------------------------------------------------------------------------ the three crashes
def test_image_to_latent_is_diffusers_layout_and_feeds_back_as_latent(sd1, pipelines, backend_name):
    """A non-square image's latent is a native (B, 4, h, w) array on every backend (MLX handed out NHWC),
    equal to diffusers' posterior mean; fed back as ``latent=`` it gives the numpy latent's images."""
    pipe, root = sd1
    t2i = pipelines.pipeline(TextToImageDiffusion, root, backend_name, scheduler="ddim")
    pixels = np.random.default_rng(0).random((1, 48, 64, 3)).astype(np.float32)
    latent = t2i.image_to_latent(pixels)
    assert isinstance(latent, native_type(backend_name)) and tuple(latent.shape) == (1, 4, 6, 8)
    with torch.no_grad():
        mean = pipe.vae.encode(torch.from_numpy(pixels.transpose(0, 3, 1, 2) * 2 - 1)).latent_dist.mean
    ref = mean.numpy() * pipe.vae.config.scaling_factor
    as_np = np.asarray(latent.cpu() if backend_name == "torch" else latent)
    assert report(f"image_to_latent vs diffusers' posterior mean (max abs) [{backend_name}]",
                  max_abs_error(as_np, ref)) < 1e-4
    walk = LatentWalkDiffusion.from_pipeline(t2i)
    args = dict(prompt="a cat", num_inference_steps=1, output_type="np", seed=0)
    np.testing.assert_array_equal(walk(latent=latent, **args), walk(latent=as_np, **args))
    assert walk(latent=latent, **args).shape == (1, 48, 64, 3)
    np.testing.assert_array_equal(t2i.latent_to_image(latent, "np"), t2i.latent_to_image(as_np, "np"))


def test_pt_output_with_latent_history(sd1, pipelines):
    """stablefused's test_return_latent_history on torch: (B, steps+1, 3, H, W), the "np" history's pixels."""
    _, root = sd1
    t2i = pipelines.pipeline(TextToImageDiffusion, root, "torch", scheduler="ddim")
    args = dict(prompt=["a", "b"], image_height=48, image_width=64, num_inference_steps=2, seed=0,
                return_latent_history=True)
    pt = t2i(output_type="pt", **args)
    assert isinstance(pt, torch.Tensor) and tuple(pt.shape) == (2, 3, 3, 48, 64)
    np.testing.assert_allclose(pt.cpu().numpy().transpose(0, 1, 3, 4, 2), t2i(output_type="np", **args), atol=1e-6)


def test_attention_slicing_takes_stablefused_and_diffusers_arguments(sd1, pipelines):
    """-1 (stablefused's default) and "auto" slice; "max", 0 and -2 are refused at the call, not mid-run."""
    _, root = sd1
    t2i = pipelines.pipeline(TextToImageDiffusion, root, scheduler="ddim")
    args = dict(prompt="a", image_height=64, image_width=64, num_inference_steps=1, seed=0, output_type="np")
    plain = t2i(**args)
    for size in (-1, "auto"):
        t2i.enable_attention_slicing(size)
        assert t2i.settings.attention_chunk == 1024
    t2i.enable_attention_slicing(5)  # a pipeline setting: in force only during this pipeline's calls
    np.testing.assert_allclose(t2i(**args), plain, atol=1e-5)
    for bad in ("max", 0, -2, 2.5, "half"):
        with pytest.raises((ValueError, TypeError), match="slice_size"):
            t2i.enable_attention_slicing(bad)
    t2i.disable_attention_slicing()
    assert t2i.settings.attention_chunk is None
