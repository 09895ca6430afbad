"""SDXL networks on both backends vs transformers / diffusers: the second text encoder (penultimate hidden
states, projected pooled embedding), the first encoder's penultimate states, and the text_time UNet with
non-default micro-conditioning; the description each model index picks."""

import numpy as np
import pytest
import torch
from helpers import PARITY, rel_error, report  # noqa: F401

from mlx_stablefused import TextToImageDiffusion
from mlx_stablefused.conditioning import Conditioning
from mlx_stablefused.errors import UnsupportedModelError

TOL = 1e-4


def _reference_text(encoder, ids):
    with torch.no_grad():
        out = encoder(torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)
    return out.hidden_states[-2].numpy(), out[0].numpy()


def test_sdxl_text_encoders_and_text_time_unet_match_diffusers(sdxl, pipelines, backend_name):
    ref, root = sdxl
    pipe = pipelines.pipeline(TextToImageDiffusion, root, backend_name)
    be = pipe.backend
    assert be.description.name == "Stable Diffusion XL"
    assert type(be.components["text_encoder_2"]).__name__ == "CLIPTextModelWithProjection"
    prompts = ["a photo of the cat", "", "an oil painting of a lighthouse at dusk, dramatic light"]
    for name, encoder in (("text_encoder", ref.text_encoder), ("text_encoder_2", ref.text_encoder_2)):
        ids = pipe.components.tokenizers[name](prompts)
        hidden, pooled = be.encode_text_states(ids, name)
        want_hidden, want_pooled = _reference_text(encoder, ids)
        assert report(f"SDXL {name} penultimate states", rel_error(be.to_numpy(hidden), want_hidden)) < TOL
        if name == "text_encoder_2":  # text_embeds: the pooled EOS state through text_projection
            assert report("SDXL text_encoder_2 text_embeds", rel_error(be.to_numpy(pooled), want_pooled)) < TOL
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 9, 6)).astype(np.float32)  # odd latent height
    ctx = rng.standard_normal((2, 77, 80)).astype(np.float32)
    pooled = rng.standard_normal((2, 40)).astype(np.float32)
    time_ids = np.array([[96, 80, 8, 16, 72, 48], [1024, 768, 0, 0, 512, 512]], np.float32)
    for t in (501.5, 0.0):
        with torch.no_grad():
            want = ref.unet(torch.from_numpy(x), t, torch.from_numpy(ctx), added_cond_kwargs={
                "text_embeds": torch.from_numpy(pooled), "time_ids": torch.from_numpy(time_ids)}).sample.numpy()
        cond = Conditioning(be.from_numpy(ctx), be.from_numpy(pooled), be.from_numpy(time_ids))
        got = be.latent_to_numpy(be.unet(be.latent_from_numpy(x), t, cond))
        assert report("SDXL text_time UNet", rel_error(got, want)) < TOL
    with pytest.raises(ValueError, match="add_embedding takes 88 features.*40 and 5 time ids"):
        be.unet(be.latent_from_numpy(x), 1.0, Conditioning(be.from_numpy(ctx), be.from_numpy(pooled),
                                                           be.from_numpy(time_ids[:, :5])))
    with pytest.raises(ValueError, match="text_embeds and time_ids"):
        be.unet(be.latent_from_numpy(x), 1.0, Conditioning(be.from_numpy(ctx)))


def test_sdxl_refiner_loads_only_its_second_encoder(sdxl_refiner, pipelines):
    ref, root = sdxl_refiner
    components = pipelines.components(TextToImageDiffusion, root, "mlx")
    assert list(components.backend.components) == ["text_encoder_2", "unet", "vae"]
    assert list(components.tokenizers) == ["text_encoder_2"]
    assert components.model_index["requires_aesthetics_score"] is True
    assert components.backend.unet_config.projection_class_embeddings_input_dim == 80


def test_text_time_config_is_checked(tmp_path):
    from mlx_stablefused.config import UNetConfig

    with pytest.raises(UnsupportedModelError, match="addition_time_embed_dim"):
        UNetConfig.from_dict({"addition_embed_type": "text_time", "projection_class_embeddings_input_dim": 8})
    with pytest.raises(UnsupportedModelError, match="addition_embed_type='image'"):
        UNetConfig.from_dict({"addition_embed_type": "image"})
