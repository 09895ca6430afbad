"""Module-level parity with diffusers / transformers on tiny random models (fp32, CPU).

Each backend's networks are reached through the loaded pipeline (``pipe.backend.text_encoder``,
``.unet_model``, ``.vae``: diffusers' module names), from the session cache.
"""

import numpy as np
import pytest
import torch
from helpers import NetworkRunner, rel_error, report

from mlx_stablefused import TextToImageDiffusion

TOL = 1e-4


def runner(pipelines, root, backend_name):
    return NetworkRunner(pipelines.pipeline(TextToImageDiffusion, root, backend_name).backend)


def test_text_encoder(tiny, pipelines, backend_name):
    pipe, root = tiny
    ids = pipe.tokenizer(["a photo of the cat", "", "the end"], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        ref = pipe.text_encoder(ids)
    hidden, pooled = runner(pipelines, root, backend_name).text(ids.numpy())
    tag = f"[{backend_name}]"
    assert report(f"text encoder hidden (rel) {tag}", rel_error(hidden, ref.last_hidden_state.numpy())) < TOL
    assert report(f"text encoder pooled (rel) {tag}", rel_error(pooled, ref.pooler_output.numpy())) < TOL


@pytest.mark.parametrize("size", [(8, 8), (9, 7)])
def test_vae_decode(tiny, size, pipelines, backend_name):
    pipe, root = tiny
    z = np.random.default_rng(0).standard_normal((2, 4, *size)).astype(np.float32)
    with torch.no_grad():
        ref = pipe.vae.decode(torch.from_numpy(z)).sample.numpy()
    ours = runner(pipelines, root, backend_name).decode(z)
    assert report(f"VAE decode (rel) [{backend_name}]", rel_error(ours, ref)) < TOL


@pytest.mark.parametrize("size", [(64, 64), (72, 56)])
def test_vae_encode(tiny, size, pipelines, backend_name):
    pipe, root = tiny
    x = np.random.default_rng(1).uniform(-1, 1, (2, 3, *size)).astype(np.float32)
    with torch.no_grad():
        dist = pipe.vae.encode(torch.from_numpy(x)).latent_dist
    mean, logvar = runner(pipelines, root, backend_name).encode(x)
    assert report(f"VAE encode mean (rel) [{backend_name}]", rel_error(mean, dist.mean.numpy())) < TOL
    assert report(f"VAE encode logvar (rel) [{backend_name}]", rel_error(logvar, dist.logvar.numpy())) < TOL


@pytest.mark.parametrize("size,t", [((8, 8), 500.0), ((9, 7), 321.5), ((6, 10), 0.0)])
def test_unet(tiny, size, t, pipelines, backend_name):
    pipe, root = tiny
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 4, *size)).astype(np.float32)
    ctx = rng.standard_normal((2, 77, 32)).astype(np.float32)
    with torch.no_grad():
        ref = pipe.unet(torch.from_numpy(x), torch.tensor(t), torch.from_numpy(ctx)).sample.numpy()
    ours = runner(pipelines, root, backend_name).unet(x, t, ctx)
    assert report(f"UNet (rel) [{backend_name}]", rel_error(ours, ref)) < TOL


def test_inpainting_unet_nine_channels(sd1_inpaint, pipelines, backend_name):
    pipe, root = sd1_inpaint
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 9, 8, 8)).astype(np.float32)
    ctx = rng.standard_normal((1, 77, 32)).astype(np.float32)
    with torch.no_grad():
        ref = pipe.unet(torch.from_numpy(x), torch.tensor(981), torch.from_numpy(ctx)).sample.numpy()
    ours = runner(pipelines, root, backend_name).unet(x, 981.0, ctx)
    assert ours.shape == (1, 4, 8, 8)
    assert report(f"UNet 9-channel inpainting (rel) [{backend_name}]", rel_error(ours, ref)) < TOL
