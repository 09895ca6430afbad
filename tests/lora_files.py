"""LoRA files for the tests, made from the tiny models with peft and diffusers, and re-encoded by hand.

``make_peft_lora`` injects a PEFT LoRA into copies of a tiny pipeline's UNet and text encoder, gives every
matrix (lora_B too) random non-zero values, and saves it with diffusers' ``save_lora_weights`` (PEFT keys,
``lora_adapter_metadata``). ``to_kohya`` writes the same matrices as kohya-ss sd-scripts names them
(``lora_unet_<path with _>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``); convolutions keep their 4-D
matrices (a 3x3 down and a 1x1 up: LyCORIS LoCon's layout). ``to_old_diffusers`` writes diffusers' older
``lora.down`` / ``lora.up`` names with attention-processor keys.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch


@contextlib.contextmanager
def peft_for_transformers() -> Iterator[None]:
    """transformers 5.24's PEFT integration asks for peft >= 0.22, which is not released for this
    environment (0.21.2 is installed); the calls diffusers makes work unchanged with 0.21.2, so the version
    check alone is lifted while diffusers loads or switches adapters on the text encoder."""
    import pytest
    import transformers.integrations.peft as integration

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(integration, "check_peft_version", lambda *a, **k: None)
        yield


@dataclass(frozen=True)
class LoRASpec:
    name: str
    unet_targets: tuple[str, ...]
    text_targets: tuple[str, ...]
    rank: int
    alpha: float
    seed: int


# A: attention, feed-forward, 1x1 (proj_in, conv_shortcut) and 3x3 convolutions (LoCon), time embedding,
# and the text encoder's attention and MLP. B: other layers, so that two adapters overlap only in part.
LORA_A = LoRASpec("a", ("to_q", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1", "conv_shortcut",
                        "time_emb_proj"), ("q_proj", "out_proj", "fc1"), rank=4, alpha=8.0, seed=21)
LORA_B = LoRASpec("b", ("to_k", "to_v", "ff.net.0.proj", "conv2", "proj_out"), ("k_proj", "fc2"), rank=2,
                  alpha=1.0, seed=22)


def _randomize_lora(module: torch.nn.Module, seed: int) -> None:
    """Every lora_A / lora_B matrix random, sized so the update is comparable to the tiny base weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                fan_in = p[0].numel()
                p.copy_(0.4 * torch.randn(p.shape, generator=g) / fan_in ** 0.5)


def make_peft_lora(pipe, spec: LoRASpec, folder: Path) -> Path:
    """Save ``spec``'s LoRA for ``pipe`` (a diffusers pipeline, left untouched) with diffusers' save_lora_weights."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    layers, metadata = {}, {}
    for component, targets in (("unet", spec.unet_targets), ("text_encoder", spec.text_targets)):
        module = copy.deepcopy(getattr(pipe, component))
        config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(targets), init_lora_weights=False)
        inject_adapter_in_model(config, module, adapter_name=spec.name)
        _randomize_lora(module, spec.seed + len(component))
        layers[component] = get_peft_model_state_dict(module, adapter_name=spec.name)
        metadata[component] = config.to_dict()
    StableDiffusionPipeline.save_lora_weights(
        str(folder), unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"],
        unet_lora_adapter_metadata=metadata["unet"], text_encoder_lora_adapter_metadata=metadata["text_encoder"],
        safe_serialization=True)
    return folder / "pytorch_lora_weights.safetensors"


def _peft_layers(path: Path) -> Iterator[tuple[str, str, torch.Tensor, torch.Tensor]]:
    """(component, module path, lora_A, lora_B) of a diffusers-saved PEFT file."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    for key in sorted(state):
        if key.endswith(".lora_A.weight"):
            component, module = key.removesuffix(".lora_A.weight").split(".", 1)
            yield component, module, state[key], state[key.replace(".lora_A.", ".lora_B.")]


LDM_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
              "conv_shortcut": "skip_connection"}


def ldm_path(path: str, layers_per_block: int = 2) -> str:
    """A diffusers UNet path in the original LDM UNet's naming, for a uniform ``layers_per_block`` (resnets and
    attentions only): the inverse of diffusers' ``_maybe_map_sgm_blocks_to_diffusers``."""
    import re

    m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", path)
    if m is None:
        m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", path)
        kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
        return f"middle_block.{1 if kind == 'attentions' else 2 * j}.{LDM_RESNET.get(rest, rest)}"
    side, block, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
    index = 1 + block * (layers_per_block + 1) + j if side == "down" else block * (layers_per_block + 1) + j
    inner = f"0.{LDM_RESNET.get(rest, rest)}" if kind == "resnets" else f"1.{rest}"
    return f"{'input_blocks' if side == 'down' else 'output_blocks'}.{index}.{inner}"


def to_kohya(peft_file: Path, alpha: float, target: Path, ldm: bool = False, sdxl: bool = False,
             layers_per_block: int = 2) -> Path:
    """The same matrices in kohya-ss sd-scripts' naming: module paths of the diffusers UNet (or, ``ldm``, of
    the original LDM UNet, as kohya names SDXL's) and of the CLIP text model (``text_model.`` included, as kohya
    writes it), ``_``-joined, with an ``.alpha``; ``sdxl``: the encoders as ``lora_te1_`` / ``lora_te2_``."""
    from safetensors.torch import save_file

    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if sdxl else "lora_te_",
                "text_encoder_2": "lora_te2_"}
    out = {}
    for component, module, down, up in _peft_layers(peft_file):
        if component.startswith("text_encoder") and not module.startswith("text_model."):
            module = "text_model." + module  # transformers 5 dropped the prefix from CLIPTextModel
        if component == "unet" and ldm:
            module = ldm_path(module, layers_per_block)
        name = prefixes[component] + module.replace(".", "_")
        out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down, up
        out[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(out, str(target))
    return target


def to_old_diffusers(peft_file: Path, target: Path) -> Path:
    """diffusers' pre-PEFT names: attention processors (``attn1.processor.to_q_lora.down.weight``) and
    ``lora.down`` / ``lora.up`` elsewhere; alpha 1 is implied, so use it for a LoRA whose alpha equals its rank."""
    from safetensors.torch import save_file

    out = {}
    for component, module, down, up in _peft_layers(peft_file):
        head, _, leaf = module.rpartition(".")
        if component == "unet" and ".attn" in module and leaf in ("to_q", "to_k", "to_v", "0"):
            if leaf == "0":
                head, leaf = head.rpartition(".")[0], "to_out"
            stem = f"unet.{head}.processor.{leaf}_lora"
        else:
            stem = f"{component}.{module}.lora"
        out[f"{stem}.down.weight"], out[f"{stem}.up.weight"] = down, up
    save_file(out, str(target))
    return target


def make_motion_lora(motion_unet, folder: Path, seed: int = 31) -> Path:
    """A MotionLoRA (PEFT, on every motion module's attention projections) for a diffusers UNetMotionModel,
    saved by diffusers' save_lora_weights, as the hub's diffusers-format MotionLoRAs hold it."""
    from diffusers import AnimateDiffPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    module = copy.deepcopy(motion_unet)
    targets = r".*motion_modules\.\d+\.transformer_blocks\.\d+\.attn\d\.(to_q|to_k|to_v|to_out\.0)"
    config = LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=targets)
    inject_adapter_in_model(config, module, adapter_name="motion")
    _randomize_lora(module, seed)
    layers = get_peft_model_state_dict(module, adapter_name="motion")
    AnimateDiffPipeline.save_lora_weights(str(folder), unet_lora_layers=layers, safe_serialization=True)
    return folder / "pytorch_lora_weights.safetensors"


def to_original_motion_lora(peft_file: Path, target: Path) -> Path:
    """The same matrices as the original AnimateDiff repo's ``v2_lora_*.ckpt`` name them (what diffusers'
    scripts/convert_animatediff_motion_lora_to_diffusers.py reads): no prefix, ``temporal_transformer``,
    ``attention_blocks.N``, attention-processor LoRA names; a torch pickle."""
    out = {}
    for _, module, down, up in _peft_layers(peft_file):
        head, _, leaf = module.rpartition(".")
        if leaf == "0":  # to_out.0
            head, leaf = head.rpartition(".")[0], "to_out"
        block, _, attn = head.rpartition(".")
        prefix, _, rest = block.partition(".transformer_blocks.")
        stem = (f"{prefix}.temporal_transformer.transformer_blocks.{rest}.attention_blocks.{int(attn[-1]) - 1}"
                f".processor.{leaf}_lora")
        out[f"{stem}.down.weight"], out[f"{stem}.up.weight"] = down, up
    torch.save({"state_dict": out}, str(target))
    return target
