"""Full SD 1.5 architecture with random weights: UNet, VAE and CLIP parity at 32x32 latents.

Slow (builds ~1.1 B parameters twice); run with ``pytest -m slow``.
"""

import json

import numpy as np
import pytest
import torch
from helpers import NetworkRunner, rel_error, report, unpack_clip_vocabulary

from mlx_stablefused import TextToImageDiffusion

pytestmark = pytest.mark.slow

SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)  # diffusers defaults = SD 1.x
SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                sample_size=512)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, hidden_act="quick_gelu")


@pytest.fixture(scope="module")
def full_size(tmp_path_factory):
    """The random full-size networks (diffusers/transformers) and ours loaded from their saved folder."""
    from tiny_models import SD1_SCHEDULER, build_text_encoder, build_unet, build_vae
    from transformers import CLIPTokenizer

    root = tmp_path_factory.mktemp("sd15-random")
    models = {
        "unet": build_unet(SD15_UNET, seed=0),
        "vae": build_vae(SD15_VAE, seed=1),
        "text_encoder": build_text_encoder(SD15_TEXT, vocab_size=49408, pad_id=49407, seed=2),
    }
    for name, m in models.items():
        m.save_pretrained(str(root / name), safe_serialization=True)
    vocabulary = unpack_clip_vocabulary(tmp_path_factory.mktemp("clip-vocabulary"))
    CLIPTokenizer.from_pretrained(str(vocabulary)).save_pretrained(str(root / "tokenizer"))
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD1_SCHEDULER))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    ours = NetworkRunner(TextToImageDiffusion(root, progress=False, use_cache=False).backend)
    return models, ours


def test_full_size_unet(full_size):
    models, ours = full_size
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 32, 32)).astype(np.float32)
    ctx = rng.standard_normal((2, 77, 768)).astype(np.float32)
    with torch.no_grad():
        ref = models["unet"](torch.from_numpy(x), torch.tensor(801), torch.from_numpy(ctx)).sample.numpy()
    assert report("full-size SD1.5 UNet, 32x32 latents (rel)", rel_error(ours.unet(x, 801.0, ctx), ref)) < 1e-4


def test_full_size_vae(full_size):
    models, ours = full_size
    z = np.random.default_rng(1).standard_normal((1, 4, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = models["vae"].decode(torch.from_numpy(z)).sample
        dist = models["vae"].encode(ref).latent_dist
    mean, _ = ours.encode(ref.numpy())
    assert report("full-size SD1.5 VAE decode (rel)", rel_error(ours.decode(z), ref.numpy())) < 1e-4
    assert report("full-size SD1.5 VAE encode mean (rel)", rel_error(mean, dist.mean.numpy())) < 1e-4


def test_full_size_clip(full_size):
    models, ours = full_size
    ids = np.random.default_rng(2).integers(0, 49406, (2, 77))
    ids[:, 0], ids[:, 20:] = 49406, 49407
    with torch.no_grad():
        ref = models["text_encoder"](torch.from_numpy(ids)).last_hidden_state.numpy()
    hidden, _ = ours.text(ids)
    assert report("full-size SD1.5 CLIP (rel)", rel_error(hidden, ref)) < 1e-4
