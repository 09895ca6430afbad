"""Tiny random-weight ControlNets fitting the tiny models (diffusers' ControlNetModel.from_unet, every parameter
randomised: the zero convolutions too, so the residuals are not zero), the control images, and the original
lllyasviel single-file layout written from a diffusers ControlNet (the inverse of diffusers'
``convert_controlnet_checkpoint``; tests check diffusers' own ``from_single_file`` reads it back)."""

from __future__ import annotations

import re

import numpy as np
from PIL import Image
from tiny_models import randomize


def build_controlnet(unet, seed: int, **overrides):
    """A ControlNet with ``unet``'s encoder layout (SDXL: its text_time embedding too), randomised."""
    import inspect

    from diffusers import ControlNetModel

    accepted = inspect.signature(ControlNetModel.__init__).parameters
    config = {k: v for k, v in unet.config.items() if k in accepted}
    config["in_channels"] = 4  # an inpainting UNet's ControlNet takes the plain latent
    return randomize(ControlNetModel(**{**config, **overrides}), seed)


def control_image(w: int = 64, h: int = 64, seed: int = 0) -> Image.Image:
    """An edge-map-like image: a few bright strokes on black."""
    rng = np.random.default_rng(seed)
    pixels = np.zeros((h, w, 3), np.uint8)
    for _ in range(6):
        y, x = rng.integers(0, h), rng.integers(0, w - 20)
        pixels[y: y + 2, x: x + 20] = 255
        pixels[rng.integers(0, h - 20):, x: x + 2] = rng.integers(60, 255, 3)
    return Image.fromarray(pixels)


_RESNET = (("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("norm2.", "out_layers.0."),
           ("conv2.", "out_layers.3."), ("time_emb_proj.", "emb_layers.1."), ("conv_shortcut.", "skip_connection."))


def to_original_format(state: dict, layers_per_block: int, blocks: int) -> dict:
    """diffusers ControlNetModel keys -> lllyasviel's ``control_model.*`` naming (SD 1.x / 2.x layout)."""
    out = {}
    per_level = layers_per_block + 1
    for key, value in state.items():
        new = None
        if key.startswith("time_embedding.linear_"):
            new = key.replace("time_embedding.linear_1", "time_embed.0").replace("time_embedding.linear_2", "time_embed.2")
        elif key.startswith("conv_in."):
            new = key.replace("conv_in.", "input_blocks.0.0.")
        elif key.startswith("controlnet_cond_embedding."):
            rest = key[len("controlnet_cond_embedding."):]
            if rest.startswith("conv_in."):
                new = "input_hint_block.0." + rest[len("conv_in."):]
            elif rest.startswith("conv_out."):
                new = f"input_hint_block.{2 * (2 * (blocks - 1) + 1)}." + rest[len("conv_out."):]
            else:
                m = re.match(r"blocks\.(\d+)\.(.*)", rest)
                new = f"input_hint_block.{2 * (int(m[1]) + 1)}.{m[2]}"
        elif m := re.match(r"controlnet_down_blocks\.(\d+)\.(.*)", key):
            new = f"zero_convs.{m[1]}.0.{m[2]}"
        elif key.startswith("controlnet_mid_block."):
            new = key.replace("controlnet_mid_block.", "middle_block_out.0.")
        elif m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            index = 1 + int(m[1]) * per_level + int(m[3])
            rest = m[4]
            if m[2] == "resnets":
                rest = next(new + rest[len(old):] for old, new in _RESNET if rest.startswith(old))
            new = f"input_blocks.{index}.{0 if m[2] == 'resnets' else 1}.{rest}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            new = f"input_blocks.{(int(m[1]) + 1) * per_level}.0.op.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
            rest = next(new + m[2][len(old):] for old, new in _RESNET if m[2].startswith(old))
            new = f"middle_block.{2 * int(m[1])}.{rest}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
            new = f"middle_block.1.{m[1]}"
        if new is None:
            raise KeyError(key)
        out["control_model." + new] = value
    return out
