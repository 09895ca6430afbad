"""Full SD 1.5 architecture with random weights: UNet, VAE and CLIP parity at 32x32 latents.

Slow (builds ~1.1 B parameters twice); run with ``pytest -m slow``.
"""

import numpy as np
import pytest
import torch
from conftest import rel_error, report

pytestmark = pytest.mark.slow

SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)  # diffusers defaults = SD 1.x
SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                sample_size=512)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, hidden_act="quick_gelu")


@pytest.fixture(scope="module")
def full_size(tmp_path_factory):
    from tiny_models import build_text_encoder, build_unet, build_vae

    root = tmp_path_factory.mktemp("sd15-random")
    models = {
        "unet": build_unet(SD15_UNET, seed=0),
        "vae": build_vae(SD15_VAE, seed=1),
        "text_encoder": build_text_encoder(SD15_TEXT, vocab_size=49408, pad_id=49407, seed=2),
    }
    for name, m in models.items():
        m.save_pretrained(str(root / name), safe_serialization=True)
    return models, root


def load(root, component):
    from test_parity_models import load_mlx

    return load_mlx(root, component)


def test_full_size_unet(full_size):
    import mlx.core as mx
    from test_parity_models import nchw_to_nhwc, nhwc_to_nchw

    models, root = full_size
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 32, 32)).astype(np.float32)
    ctx = rng.standard_normal((2, 77, 768)).astype(np.float32)
    with torch.no_grad():
        ref = models["unet"](torch.from_numpy(x), torch.tensor(801), torch.from_numpy(ctx)).sample.numpy()
    ours = nhwc_to_nchw(load(root, "unet")(nchw_to_nhwc(x), mx.array(801.0), mx.array(ctx)))
    assert report("full-size SD1.5 UNet, 32x32 latents (rel)", rel_error(ours, ref)) < 1e-4


def test_full_size_vae(full_size):
    from test_parity_models import nchw_to_nhwc, nhwc_to_nchw

    models, root = full_size
    vae = load(root, "vae")
    z = np.random.default_rng(1).standard_normal((1, 4, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = models["vae"].decode(torch.from_numpy(z)).sample
        dist = models["vae"].encode(ref).latent_dist
    dec = nhwc_to_nchw(vae.decode(nchw_to_nhwc(z)))
    mean, _ = vae.encode(nchw_to_nhwc(ref.numpy()))
    assert report("full-size SD1.5 VAE decode (rel)", rel_error(dec, ref.numpy())) < 1e-4
    assert report("full-size SD1.5 VAE encode mean (rel)", rel_error(nhwc_to_nchw(mean), dist.mean.numpy())) < 1e-4


def test_full_size_clip(full_size):
    import mlx.core as mx

    models, root = full_size
    ids = np.random.default_rng(2).integers(0, 49406, (2, 77))
    ids[:, 0], ids[:, 20:] = 49406, 49407
    with torch.no_grad():
        ref = models["text_encoder"](torch.from_numpy(ids)).last_hidden_state.numpy()
    ours = load(root, "text_encoder")(mx.array(ids)).last_hidden_state
    assert report("full-size SD1.5 CLIP (rel)", rel_error(ours, ref)) < 1e-4
