"""The original ControlNet checkpoint format (lllyasviel's ``control_v11*.pth`` / ``.safetensors``,
``control_sd15_*``; thibaud's SD 2.1 files without the prefix) as data: which tensor makes each diffusers
ControlNetModel parameter, and the architecture the tensor shapes say. Reads headers only; the ControlNet
source (``controlnets``) writes the inferred config once into the cache.

Keys (``control_model.`` removed): ``time_embed``, ``input_blocks`` and ``middle_block`` as in the LDM UNet
(``ldm_checkpoint.unet_key_map``), ``input_hint_block.{0, 2, ..., 2k}`` the conditioning embedding's
convolutions (SiLUs at the odd indices), ``zero_convs.N.0`` the zero convolutions, ``middle_block_out.0``
the mid block's, as diffusers' ``convert_controlnet_checkpoint`` maps them. Not stored: the attention heads
(SD 1.x: 8 per block; 1024-wide cross-attention, SD 2.x: 64-channel heads), ``upcast_attention`` (False)
and the GroupNorm groups (32): pass ``config=`` (a diffusers ControlNet folder or hub id) when they differ.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from .errors import UnsupportedModelError, WeightLoadError
from .ldm_checkpoint import OriginalConfig, key_groups, unet_config, unet_key_map
from .weights import KeyMap

CONTROL_PREFIX = "control_model."
OWN = re.compile(r"(input_hint_block\.\d+|zero_convs\.\d+\.0|middle_block_out\.0)\.(weight|bias)")
SDXL_KEYS = ("label_emb.",)


def is_original_controlnet(keys: Any) -> bool:
    """Whether a checkpoint's keys are the original ControlNet format (prefixed or not)."""
    keys = list(keys)
    return any(k.startswith(CONTROL_PREFIX + "input_hint_block.") or k.startswith("input_hint_block.") for k in keys)


def controlnet_plan(shapes: Mapping[str, tuple[int, ...]], origin: str) -> tuple[KeyMap, dict[str, Any]]:
    """(key map onto ControlNetModel's names, the inferred diffusers config) of an original-format file."""
    keys = list(shapes)
    prefix = CONTROL_PREFIX if any(k.startswith(CONTROL_PREFIX) for k in keys) else ""
    inner = {k[len(prefix):]: k for k in keys if k.startswith(prefix)}
    if not is_original_controlnet(keys):
        raise UnsupportedModelError(
            f"{origin} is not a ControlNet in the original format (no 'control_model.input_hint_block.*' keys): it "
            f"holds {key_groups(keys)}; a diffusers ControlNet is a folder (config.json and "
            "diffusion_pytorch_model.safetensors) or a hub id")
    if any(k.startswith(SDXL_KEYS) for k in inner):
        raise UnsupportedModelError(f"{origin}: an SDXL ControlNet in the original format ('label_emb.*' keys) is not "
                                    "supported; load its diffusers folder or hub id")
    own = {k: v for k, v in inner.items() if OWN.fullmatch(k)}
    names, down, _ = unet_key_map([k for k in inner if k not in own], encoder_only=True)
    key_map: KeyMap = {t: (inner[s], ()) for t, s in names.items()}

    hint = sorted({int(m[1]) for k in own for m in [re.match(r"input_hint_block\.(\d+)\.", k)] if m})
    if len(hint) < 2:
        raise WeightLoadError(f"{origin}: the conditioning embedding ('input_hint_block') is incomplete")
    targets = ["conv_in"] + [f"blocks.{j}" for j in range(len(hint) - 2)] + ["conv_out"]
    for index, target in zip(hint, targets):
        for p in ("weight", "bias"):
            key_map[f"controlnet_cond_embedding.{target}.{p}"] = (own[f"input_hint_block.{index}.{p}"], ())
    zero = sorted({int(m[1]) for k in own for m in [re.match(r"zero_convs\.(\d+)\.", k)] if m})
    for i in zero:
        for p in ("weight", "bias"):
            key_map[f"controlnet_down_blocks.{i}.{p}"] = (own[f"zero_convs.{i}.0.{p}"], ())
    for p in ("weight", "bias"):
        if f"middle_block_out.0.{p}" not in own:
            raise WeightLoadError(f"{origin}: the mid block's zero convolution ('middle_block_out.0') is missing")
        key_map[f"controlnet_mid_block.{p}"] = (own[f"middle_block_out.0.{p}"], ())

    unet_shapes = {t: shapes[s] for t, (s, _) in key_map.items()}
    cross = [unet_shapes[k][1] for k in unet_shapes if k.endswith("attn2.to_k.weight")]
    family = "sd2" if cross and cross[0] == 1024 else "sd1"
    unet = unet_config(unet_shapes, {t: t for t in unet_shapes}, down, family, OriginalConfig())
    hint_shapes = [shapes[own[f"input_hint_block.{i}.weight"]] for i in hint]
    widths = [hint_shapes[0][0]] + [s[0] for s in hint_shapes[1:-1]][1::2]
    config = {"_class_name": "ControlNetModel", "conditioning_channels": hint_shapes[0][1],
              "conditioning_embedding_out_channels": widths,
              **{k: v for k, v in unet.items() if k not in ("up_block_types", "out_channels")}}
    if len(zero) != sum(down) + len(down):  # conv_in's, one per layer, one per downsampler
        raise WeightLoadError(f"{origin}: {len(zero)} zero convolutions for the encoder's "
                              f"{sum(down) + len(down)} skip states; is the file complete?")
    return key_map, config
