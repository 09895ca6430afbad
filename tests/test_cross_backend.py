"""MLX and torch backends: the same seed gives the same image, for every pipeline and stochastic samplers too
(text-to-image: test_parity_text_to_image.py, which shares its runs with the diffusers checks).

Also: both backends load the same sources (diffusers folder, converted MLX folder) strictly, and the
CUDA / MPS checks run where such a device exists.
"""

import numpy as np
import pytest
import torch
from helpers import convert_with_cli, max_abs_error, report
from PIL import Image

from mlx_stablefused import (ImageToImageDiffusion, InpaintDiffusion, LatentWalkDiffusion, TextToImageDiffusion,
                             WeightLoadError)

TOL = 5e-3


def both(pipelines, cls, root, scheduler=None):
    """The same cached model as an MLX pipeline and a torch-on-CPU pipeline."""
    return (pipelines.pipeline(cls, root, "mlx", scheduler=scheduler),
            pipelines.pipeline(cls, root, "torch", scheduler=scheduler, device="cpu"))


def image(w=64, h=64):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def mask(w=64, h=64):
    m = np.zeros((h, w), np.uint8)
    m[8:40, 16:56] = 255
    return Image.fromarray(m)


@pytest.mark.parametrize("scheduler", ["heun", "euler_ancestral"])
def test_image_to_image_same_seed_same_image(sd1, pipelines, scheduler):
    _, root = sd1
    a, b = both(pipelines, ImageToImageDiffusion, root, scheduler)
    args = dict(image=image(), prompt="a cat", num_inference_steps=4, strength=0.75, seed=7, output_type="np")
    err = max_abs_error(a(**args), b(**args))
    assert report("MLX vs torch, image-to-image, same seed (max abs)", err) < TOL


@pytest.mark.parametrize("model", ["sd1", "sd1_inpaint"])
def test_inpainting_same_seed_same_image(request, model, pipelines):
    _, root = request.getfixturevalue(model)
    a, b = both(pipelines, InpaintDiffusion, root, "euler_ancestral")
    args = dict(prompt="a cat", image=image(64, 48), mask=mask(64, 48), num_inference_steps=4, seed=3,
                output_type="np")
    err = max_abs_error(a(**args), b(**args))
    assert report("MLX vs torch, inpainting, same seed (max abs)", err) < TOL


def test_interpolation_same_seed_same_frames(sd1, pipelines):
    _, root = sd1
    a, b = both(pipelines, LatentWalkDiffusion, root)
    args = dict(prompt=["a", "b"], image_height=64, image_width=64, num_inference_steps=3, interpolation_steps=3,
                seed=1, output_type="np")
    assert report("MLX vs torch, interpolation (max abs)", max_abs_error(a.interpolate(**args), b.interpolate(**args))) < TOL


def test_torch_native_output_is_nchw_tensor(sd1, pipelines):
    _, root = sd1
    _, b = both(pipelines, TextToImageDiffusion, root)
    out = b("x", num_inference_steps=2, seed=0, image_height=64, image_width=48, output_type="pt")
    assert isinstance(out, torch.Tensor) and out.shape == (1, 3, 64, 48)
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0


def test_torch_loads_converted_mlx_folder(sd1, pipelines, tmp_path):
    _, root = sd1
    out = convert_with_cli(root, tmp_path / "mlx")
    args = dict(prompt="x", num_inference_steps=2, seed=0, image_height=64, image_width=64, output_type="np")
    from_diffusers = pipelines.pipeline(TextToImageDiffusion, root, "torch")(**args)
    from_converted = TextToImageDiffusion(out, backend="torch", progress=False)(**args)
    np.testing.assert_allclose(from_converted, from_diffusers, atol=1e-6)


def test_torch_loading_is_strict(sd1, tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    _, root = sd1
    copy = tmp_path / "model"
    shutil.copytree(root, copy)
    path = copy / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(path))
    tensors.pop("conv_in.bias")
    tensors["conv_out.bias"] = np.zeros(5, np.float32)
    save_file(tensors, str(path))
    with pytest.raises(WeightLoadError, match=r"1 missing: 'conv_in\.bias'"):
        TextToImageDiffusion(copy, backend="torch", progress=False)


def test_torch_float16_keeps_the_vae_in_float32(sd1):
    _, root = sd1
    pipe = TextToImageDiffusion(root, backend="torch", device="cpu", dtype="float16", progress=False)
    assert pipe.backend.unet_model.conv_in.weight.dtype == torch.float16
    assert pipe.backend.vae.decoder.conv_in.weight.dtype == torch.float32


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,tol", [("float32", 5e-3), ("float16", 3e-2)])
def test_cuda_matches_cpu(sd1, dtype, tol):
    _, root = sd1
    args = dict(prompt="a cat", num_inference_steps=4, seed=0, image_height=64, image_width=64, output_type="np")
    cpu = TextToImageDiffusion(root, backend="torch", device="cpu", progress=False)(**args)
    gpu = TextToImageDiffusion(root, backend="torch", device="cuda", dtype=dtype, progress=False)(**args)
    assert report(f"torch CUDA {dtype} vs CPU fp32 (max abs)", np.abs(gpu - cpu).max()) < tol


@pytest.mark.mps
@pytest.mark.skipif(not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
                    reason="needs Apple MPS")
def test_mps_matches_cpu(sd1):
    _, root = sd1
    args = dict(prompt="a cat", num_inference_steps=4, seed=0, image_height=64, image_width=64, output_type="np")
    cpu = TextToImageDiffusion(root, backend="torch", device="cpu", progress=False)(**args)
    mps = TextToImageDiffusion(root, backend="torch", device="mps", progress=False)(**args)
    assert np.abs(mps - cpu).max() < 5e-3
