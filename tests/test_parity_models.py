"""Module-level parity with diffusers / transformers on tiny random models (fp32, CPU)."""

import numpy as np
import pytest
import torch

import mlx.core as mx
from conftest import rel_error, report

from mlx_stablefused.backends.mlx.loading import NETWORKS as MLX_NETWORKS
from mlx_stablefused.model_loading import load_network

TOL = 1e-4


def load_mlx(root, component):
    return load_network(root, component, MLX_NETWORKS)


def nchw_to_nhwc(x):
    return mx.array(np.ascontiguousarray(x.transpose(0, 2, 3, 1)))


def nhwc_to_nchw(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


class Runner:
    """Runs one component on a backend with numpy in and out, in diffusers' NCHW layout."""

    def __init__(self, backend, root, component):
        self.backend = backend
        if backend == "mlx":
            self.model = load_mlx(root, component)
        else:
            from mlx_stablefused.backends.torch.loading import TorchNetworks

            self.model = load_network(root, component, TorchNetworks("cpu"))

    def _in(self, x, image=True):
        if self.backend == "mlx":
            return nchw_to_nhwc(x) if image else mx.array(x)
        return torch.from_numpy(np.ascontiguousarray(x))

    def _out(self, y, image=True):
        if self.backend == "mlx":
            return nhwc_to_nchw(y) if image else np.asarray(y)
        return y.detach().numpy()

    def text(self, ids):
        with torch.no_grad():
            out = self.model(self._in(ids, image=False))
        return self._out(out.last_hidden_state, False), self._out(out.pooler_output, False)

    def decode(self, z):
        with torch.no_grad():
            return self._out(self.model.decode(self._in(z)))

    def encode(self, x):
        with torch.no_grad():
            mean, logvar = self.model.encode(self._in(x))
        return self._out(mean), self._out(logvar)

    def unet(self, x, t, ctx):
        with torch.no_grad():
            t_in = mx.array(t) if self.backend == "mlx" else torch.tensor(t)
            return self._out(self.model(self._in(x), t_in, self._in(ctx, image=False)))


def test_text_encoder(tiny, backend_name):
    pipe, root = tiny
    ids = pipe.tokenizer(["a photo of the cat", "", "the end"], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        ref = pipe.text_encoder(ids)
    hidden, pooled = Runner(backend_name, root, "text_encoder").text(ids.numpy())
    tag = f"[{backend_name}]"
    assert report(f"text encoder hidden (rel) {tag}", rel_error(hidden, ref.last_hidden_state.numpy())) < TOL
    assert report(f"text encoder pooled (rel) {tag}", rel_error(pooled, ref.pooler_output.numpy())) < TOL


@pytest.mark.parametrize("size", [(8, 8), (9, 7)])
def test_vae_decode(tiny, size, backend_name):
    pipe, root = tiny
    z = np.random.default_rng(0).standard_normal((2, 4, *size)).astype(np.float32)
    with torch.no_grad():
        ref = pipe.vae.decode(torch.from_numpy(z)).sample.numpy()
    ours = Runner(backend_name, root, "vae").decode(z)
    assert report(f"VAE decode (rel) [{backend_name}]", rel_error(ours, ref)) < TOL


@pytest.mark.parametrize("size", [(64, 64), (72, 56)])
def test_vae_encode(tiny, size, backend_name):
    pipe, root = tiny
    x = np.random.default_rng(1).uniform(-1, 1, (2, 3, *size)).astype(np.float32)
    with torch.no_grad():
        dist = pipe.vae.encode(torch.from_numpy(x)).latent_dist
    mean, logvar = Runner(backend_name, root, "vae").encode(x)
    assert report(f"VAE encode mean (rel) [{backend_name}]", rel_error(mean, dist.mean.numpy())) < TOL
    assert report(f"VAE encode logvar (rel) [{backend_name}]", rel_error(logvar, dist.logvar.numpy())) < TOL


@pytest.mark.parametrize("size,t", [((8, 8), 500.0), ((9, 7), 321.5), ((6, 10), 0.0)])
def test_unet(tiny, size, t, backend_name):
    pipe, root = tiny
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 4, *size)).astype(np.float32)
    ctx = rng.standard_normal((2, 77, 32)).astype(np.float32)
    with torch.no_grad():
        ref = pipe.unet(torch.from_numpy(x), torch.tensor(t), torch.from_numpy(ctx)).sample.numpy()
    ours = Runner(backend_name, root, "unet").unet(x, t, ctx)
    assert report(f"UNet (rel) [{backend_name}]", rel_error(ours, ref)) < TOL


def test_inpainting_unet_nine_channels(tmp_path, backend_name):
    from tiny_models import INPAINT_UNET, build_unet

    ref_model = build_unet(INPAINT_UNET, seed=5)
    ref_model.save_pretrained(str(tmp_path / "unet"), safe_serialization=True)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 9, 8, 8)).astype(np.float32)
    ctx = rng.standard_normal((1, 77, 32)).astype(np.float32)
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(x), torch.tensor(981), torch.from_numpy(ctx)).sample.numpy()
    ours = Runner(backend_name, tmp_path, "unet").unet(x, 981.0, ctx)
    assert ours.shape == (1, 4, 8, 8)
    assert report(f"UNet 9-channel inpainting (rel) [{backend_name}]", rel_error(ours, ref)) < TOL
