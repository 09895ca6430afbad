"""Module-level parity with diffusers / transformers on tiny random models (fp32, CPU)."""

import numpy as np
import pytest
import torch

import mlx.core as mx
from conftest import rel_error, report

from mlx_stablefused.backends.mlx.loading import build_component, read_diffusers_component
from mlx_stablefused.weights import apply_weights

TOL = 1e-4


def load_mlx(root, component):
    model = build_component(root, component)
    apply_weights(model, read_diffusers_component(root, component, model, None, None), component)
    return model


def nchw_to_nhwc(x):
    return mx.array(np.ascontiguousarray(x.transpose(0, 2, 3, 1)))


def nhwc_to_nchw(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


def test_text_encoder(tiny):
    pipe, root = tiny
    ids = pipe.tokenizer(["a photo of the cat", "", "the end"], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        ref = pipe.text_encoder(ids)
    ours = load_mlx(root, "text_encoder")(mx.array(ids.numpy()))
    assert report("text encoder hidden (rel)", rel_error(ours.last_hidden_state, ref.last_hidden_state.numpy())) < TOL
    assert report("text encoder pooled (rel)", rel_error(ours.pooler_output, ref.pooler_output.numpy())) < TOL


@pytest.mark.parametrize("size", [(8, 8), (9, 7)])
def test_vae_decode(tiny, size):
    pipe, root = tiny
    z = np.random.default_rng(0).standard_normal((2, 4, *size)).astype(np.float32)
    with torch.no_grad():
        ref = pipe.vae.decode(torch.from_numpy(z)).sample.numpy()
    ours = nhwc_to_nchw(load_mlx(root, "vae").decode(nchw_to_nhwc(z)))
    assert report("VAE decode (rel)", rel_error(ours, ref)) < TOL


@pytest.mark.parametrize("size", [(64, 64), (72, 56)])
def test_vae_encode(tiny, size):
    pipe, root = tiny
    x = np.random.default_rng(1).uniform(-1, 1, (2, 3, *size)).astype(np.float32)
    with torch.no_grad():
        dist = pipe.vae.encode(torch.from_numpy(x)).latent_dist
    mean, logvar = load_mlx(root, "vae").encode(nchw_to_nhwc(x))
    assert report("VAE encode mean (rel)", rel_error(nhwc_to_nchw(mean), dist.mean.numpy())) < TOL
    assert report("VAE encode logvar (rel)", rel_error(nhwc_to_nchw(logvar), dist.logvar.numpy())) < TOL


@pytest.mark.parametrize("size,t", [((8, 8), 500.0), ((9, 7), 321.5), ((6, 10), 0.0)])
def test_unet(tiny, size, t):
    pipe, root = tiny
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 4, *size)).astype(np.float32)
    ctx = rng.standard_normal((2, 77, 32)).astype(np.float32)
    with torch.no_grad():
        ref = pipe.unet(torch.from_numpy(x), torch.tensor(t), torch.from_numpy(ctx)).sample.numpy()
    ours = nhwc_to_nchw(load_mlx(root, "unet")(nchw_to_nhwc(x), mx.array(t), mx.array(ctx)))
    assert report("UNet (rel)", rel_error(ours, ref)) < TOL


def test_inpainting_unet_nine_channels(tmp_path):
    from tiny_models import INPAINT_UNET, build_unet

    ref_model = build_unet(INPAINT_UNET, seed=5)
    ref_model.save_pretrained(str(tmp_path / "unet"), safe_serialization=True)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 9, 8, 8)).astype(np.float32)
    ctx = rng.standard_normal((1, 77, 32)).astype(np.float32)
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(x), torch.tensor(981), torch.from_numpy(ctx)).sample.numpy()
    ours = nhwc_to_nchw(load_mlx(tmp_path, "unet")(nchw_to_nhwc(x), mx.array(981.0), mx.array(ctx)))
    assert ours.shape == (1, 4, 8, 8)
    assert report("UNet 9-channel inpainting (rel)", rel_error(ours, ref)) < TOL
