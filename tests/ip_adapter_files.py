"""Tiny random IP-Adapters in h94/IP-Adapter's file layout, built for a diffusers UNet, and a tiny random
CLIPVisionModelWithProjection folder beside them (``<root>/models/<file>``, ``<root>/models/image_encoder``).

The layer numbering is the original IP-Adapter repo's, taken from diffusers' own ``unet.attn_processors``
(each attn2's index in that list, motion modules left out), so the tests do not trust the port's numbering.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

ENCODER = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
               patch_size=8, hidden_act="gelu", layer_norm_eps=1e-5)
TOKENS = 4  # diffusers builds every plain IP-Adapter projection with 4 tokens
PLUS = dict(hidden=32, queries=8, depth=4, inner=128, ff=128)  # diffusers reads heads of 64 and builds depth 4


def build_image_encoder(folder: Path, projection_dim: int = 24, seed: int = 21, **overrides) -> Path:
    """A random CLIPVisionModelWithProjection saved as transformers saves it (config.json + model.safetensors)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from tiny_models import randomize

    model = CLIPVisionModelWithProjection(CLIPVisionConfig(projection_dim=projection_dim, **{**ENCODER, **overrides}))
    randomize(model, seed).eval()
    model.save_pretrained(str(folder))
    return folder


def plus_image_proj(rand, cross: int, embed: int) -> dict[str, torch.Tensor]:
    """The original IP-Adapter Plus resampler's keys (``layers.<i>.0`` its PerceiverAttention with ``to_kv``,
    ``layers.<i>.1`` its LayerNorm + GELU feed-forward), random."""
    d = PLUS["hidden"]
    state = {"latents": rand(1, PLUS["queries"], d, scale=0.5), "proj_in.weight": rand(d, embed),
             "proj_in.bias": rand(d, scale=0.05), "proj_out.weight": rand(cross, d), "proj_out.bias": rand(cross),
             "norm_out.weight": 1.0 + rand(cross, scale=0.1), "norm_out.bias": rand(cross, scale=0.1)}
    for i in range(PLUS["depth"]):
        for norm in ("0.norm1", "0.norm2", "1.0"):
            state[f"layers.{i}.{norm}.weight"] = 1.0 + rand(d, scale=0.1)
            state[f"layers.{i}.{norm}.bias"] = rand(d, scale=0.1)
        state[f"layers.{i}.0.to_q.weight"] = rand(PLUS["inner"], d)
        state[f"layers.{i}.0.to_kv.weight"] = rand(2 * PLUS["inner"], d)
        state[f"layers.{i}.0.to_out.weight"] = rand(d, PLUS["inner"])
        state[f"layers.{i}.1.1.weight"] = rand(PLUS["ff"], d)
        state[f"layers.{i}.1.3.weight"] = rand(d, PLUS["ff"])
    return state


def ip_adapter_state(unet, image_embed_dim: int, seed: int = 22, plus: bool = False) -> dict[str, torch.Tensor]:
    """``image_proj.*`` and ``ip_adapter.<id>.to_k_ip/to_v_ip.weight`` for ``unet`` (a diffusers UNet), random;
    ``plus``: IP-Adapter Plus's resampler (``image_embed_dim``: the encoder's hidden size)."""
    g = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    if plus:
        state = {f"image_proj.{k}": v for k, v in plus_image_proj(rand, cross, image_embed_dim).items()}
    else:
        state = {"image_proj.proj.weight": rand(TOKENS * cross, image_embed_dim),
                 "image_proj.proj.bias": rand(TOKENS * cross, scale=0.05),
                 "image_proj.norm.weight": 1.0 + rand(cross, scale=0.1), "image_proj.norm.bias": rand(cross, scale=0.1)}
    names = [n for n in unet.attn_processors if "motion_modules" not in n]
    modules = dict(unet.named_modules())
    for index, name in enumerate(names):
        if name.endswith("attn2.processor"):
            inner = modules[name.removesuffix(".processor")].to_k.out_features
            state[f"ip_adapter.{index}.to_k_ip.weight"] = rand(inner, cross, scale=0.3)
            state[f"ip_adapter.{index}.to_v_ip.weight"] = rand(inner, cross, scale=0.3)
    return state


def build_ip_adapter(root: Path, unet, weight_name: str = "ip-adapter_tiny.safetensors", projection_dim: int = 24,
                     encoder: bool = True, seed: int = 22, plus: bool = False) -> Path:
    """``root/models/<weight_name>`` (safetensors, or a .bin of nested dicts as the original repo saves it)
    and, with ``encoder``, ``root/models/image_encoder``. Returns the weight file. ``plus``: an IP-Adapter
    Plus (its resampler reads the encoder's hidden states)."""
    models = root / "models"
    models.mkdir(parents=True, exist_ok=True)
    state = ip_adapter_state(unet, ENCODER["hidden_size"] if plus else projection_dim, seed, plus)
    path = models / weight_name
    if weight_name.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        nested: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
        for key, value in state.items():
            group, rest = key.split(".", 1)
            nested[group][rest] = value
        torch.save(nested, str(path))
    if encoder and not (models / "image_encoder").is_dir():
        build_image_encoder(models / "image_encoder", projection_dim)
    return path


def ip_image(seed: int = 4, size: tuple[int, int] = (56, 40)):
    """A random RGB image of another size and aspect than the encoder's, so resizing and cropping both run."""
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
