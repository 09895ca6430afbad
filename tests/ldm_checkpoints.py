"""Single-file checkpoints made from diffusers models: the inverse mapping (diffusers -> original CompVis/LDM
keys), written here from the diffusers block layout independently of mlx_stablefused.single_file, and
checked against diffusers' own ``from_single_file`` by the tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
          "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


def _per_block(value: Any, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def _resnet(rest: str) -> str:
    name, tail = rest.split(".", 1)
    return f"{RESNET[name]}.{tail}"


def unet_to_ldm(state: dict, config: dict) -> dict:
    """diffusers UNet2DConditionModel keys -> ``model.diffusion_model.*`` (input/middle/output blocks)."""
    n = len(config["block_out_channels"])
    layers = _per_block(config["layers_per_block"], n)
    down_start = [1 + sum(layers[b] + 1 for b in range(i)) for i in range(n)]
    up_layers = [x + 1 for x in reversed(layers)]
    up_start = [sum(up_layers[:u]) for u in range(n)]
    fixed = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}  # SDXL text_time
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        head = ".".join(parts[:-1])
        if head in fixed:
            ldm = f"{fixed[head]}.{parts[-1]}"
        elif parts[0] == "down_blocks":
            b, kind = int(parts[1]), parts[2]
            if kind == "downsamplers":
                ldm = f"input_blocks.{down_start[b] + layers[b]}.0.op.{parts[-1]}"
            else:
                j, rest = int(parts[3]), ".".join(parts[4:])
                block = f"input_blocks.{down_start[b] + j}"
                ldm = f"{block}.0.{_resnet(rest)}" if kind == "resnets" else f"{block}.1.{rest}"
        elif parts[0] == "mid_block":
            j, rest = int(parts[2]), ".".join(parts[3:])
            ldm = f"middle_block.{2 * j}.{_resnet(rest)}" if parts[1] == "resnets" else f"middle_block.1.{rest}"
        elif parts[0] == "up_blocks":
            u, kind = int(parts[1]), parts[2]
            if kind == "upsamplers":
                attn = config["up_block_types"][u].startswith("CrossAttn")
                ldm = f"output_blocks.{up_start[u] + up_layers[u] - 1}.{2 if attn else 1}.conv.{parts[-1]}"
            else:
                j, rest = int(parts[3]), ".".join(parts[4:])
                block = f"output_blocks.{up_start[u] + j}"
                ldm = f"{block}.0.{_resnet(rest)}" if kind == "resnets" else f"{block}.1.{rest}"
        else:
            raise KeyError(key)
        out["model.diffusion_model." + ldm] = value
    return out


def vae_to_ldm(state: dict, config: dict, prefix: str = "first_stage_model.") -> dict:
    """diffusers AutoencoderKL keys -> LDM's (encoder.down.i.block.j, mid.attn_1 as 1x1 convolutions)."""
    n = len(config["block_out_channels"])
    out = {}
    for key, value in state.items():
        ldm = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        parts = ldm.split(".")
        if parts[1] == "down_blocks":
            i, kind = parts[2], parts[3]
            ldm = (f"encoder.down.{i}.downsample.conv.{parts[-1]}" if kind == "downsamplers"
                   else f"encoder.down.{i}.block.{parts[4]}.{'.'.join(parts[5:])}")
        elif parts[1] == "up_blocks":
            b, kind = n - 1 - int(parts[2]), parts[3]
            ldm = (f"decoder.up.{b}.upsample.conv.{parts[-1]}" if kind == "upsamplers"
                   else f"decoder.up.{b}.block.{parts[4]}.{'.'.join(parts[5:])}")
        elif parts[1] == "mid_block" and parts[2] == "resnets":
            ldm = f"{parts[0]}.mid.block_{int(parts[3]) + 1}.{'.'.join(parts[4:])}"
        elif parts[1] == "mid_block":
            name = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}[parts[4]]
            ldm = f"{parts[0]}.mid.attn_1.{name}.{parts[-1]}"
            if value.ndim == 2:
                value = value.reshape(*value.shape, 1, 1)
        out[prefix + ldm] = value
    return out


def clip_to_ldm(state: dict, prefix: str = "cond_stage_model.transformer.") -> dict:
    """transformers CLIPTextModel keys -> ``cond_stage_model.transformer.text_model.*`` (SD 1.x; SDXL's CLIP-L:
    ``conditioner.embedders.0.transformer.``), with the ``position_ids`` buffer real files carry."""
    out = {prefix + (k if k.startswith("text_model.") else "text_model." + k): v
           for k, v in state.items() if not k.endswith("position_ids")}
    positions = next(v for k, v in state.items() if k.endswith("position_embedding.weight")).shape[0]
    out[prefix + "text_model.embeddings.position_ids"] = torch.arange(positions)[None]
    return out


def clip_to_open_clip(state: dict, seed: int = 5, prefix: str = "cond_stage_model.model.") -> dict:
    """transformers CLIPTextModel keys -> OpenCLIP's ``cond_stage_model.model.*`` (fused in_proj, resblocks).
    SD 2 (a state without ``text_projection.weight``): plus what its files hold and do not use, one more (last)
    resblock, a text_projection, logit_scale. SDXL (CLIPTextModelWithProjection's state, prefix
    ``conditioner.embedders.N.model.``): every layer, ``text_projection`` as OpenCLIP's (width, projection)."""
    projection = state.get("text_projection.weight")
    state = {k.removeprefix("text_model."): v for k, v in state.items()
             if not k.endswith("position_ids") and k != "text_projection.weight"}
    p = prefix
    out = {p + "token_embedding.weight": state["embeddings.token_embedding.weight"],
           p + "positional_embedding": state["embeddings.position_embedding.weight"],
           p + "ln_final.weight": state["final_layer_norm.weight"], p + "ln_final.bias": state["final_layer_norm.bias"]}
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"{p}transformer.resblocks.{i}."
        for ours, theirs in names.items():
            for t in ("weight", "bias"):
                out[f"{dst}{theirs}.{t}"] = state[f"{src}{ours}.{t}"]
        for t in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{t}"] = torch.cat([state[f"{src}self_attn.{q}_proj.{t}"] for q in "qkv"])
    if projection is not None:
        out[p + "text_projection"] = projection.T.contiguous()
        out[p + "logit_scale"] = torch.tensor(4.6)
        return out
    g = torch.Generator().manual_seed(seed)
    last = f"{p}transformer.resblocks.{len(layers)}."
    for k in [k for k in out if k.startswith(f"{p}transformer.resblocks.0.")]:
        out[last + k.split("resblocks.0.", 1)[1]] = torch.randn(out[k].shape, generator=g)
    hidden = out[p + "ln_final.weight"].shape[0]
    out[p + "text_projection"] = torch.randn(hidden, hidden, generator=g)
    out[p + "logit_scale"] = torch.tensor(4.6)
    return out


def ema_copies(state: dict, perturb: float = 0.01, seed: int = 9) -> tuple[dict, dict]:
    """(checkpoint with EMA copies, the non-EMA UNet weights): as training checkpoints are, ``model_ema.*``
    holds the given weights (keys with the dots removed) and ``model.diffusion_model.*`` a perturbed copy."""
    g = torch.Generator().manual_seed(seed)
    out, raw = dict(state), {}
    for k, v in state.items():
        if k.startswith("model.diffusion_model."):
            out["model_ema." + "".join(k.split(".")[1:])] = v
            out[k] = raw[k] = v + perturb * torch.randn(v.shape, generator=g, dtype=v.dtype)
    out["model_ema.decay"], out["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(1000, dtype=torch.int32)
    return out, raw


def ldm_state(pipe: Any, open_clip: bool = False) -> dict:
    """A diffusers StableDiffusion pipeline's modules as one LDM state dict (fp32 torch tensors)."""
    state = unet_to_ldm(pipe.unet.state_dict(), dict(pipe.unet.config))
    state.update(vae_to_ldm(pipe.vae.state_dict(), dict(pipe.vae.config)))
    text = pipe.text_encoder.state_dict()
    state.update(clip_to_open_clip(text) if open_clip else clip_to_ldm(text))
    state["alphas_cumprod"] = torch.linspace(0.999, 0.005, 1000)  # a scheduler buffer, as real files have
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def sdxl_state(pipe: Any, clone: bool = True) -> dict:
    """A diffusers SDXL pipeline (base, or a refiner without ``text_encoder``) as one Stability checkpoint:
    ``conditioner.embedders.0.transformer.*`` (CLIP-L) and ``.1.model.*`` (OpenCLIP bigG), or the refiner's
    ``embedders.0.model.*``."""
    state = unet_to_ldm(pipe.unet.state_dict(), dict(pipe.unet.config))
    state.update(vae_to_ldm(pipe.vae.state_dict(), dict(pipe.vae.config)))
    second = "conditioner.embedders.1.model." if pipe.text_encoder is not None else "conditioner.embedders.0.model."
    if pipe.text_encoder is not None:
        state.update(clip_to_ldm(pipe.text_encoder.state_dict(), "conditioner.embedders.0.transformer."))
    state.update(clip_to_open_clip(pipe.text_encoder_2.state_dict(), prefix=second))
    state["alphas_cumprod"] = torch.linspace(0.999, 0.005, 1000)
    return {k: v.detach().clone().contiguous() for k, v in state.items()} if clone else state


def save_single_file(state: dict, path: Path, dtype: torch.dtype | None = None) -> Path:
    """``state`` as .safetensors or (in a ``state_dict`` wrapper, as training saves it) .ckpt."""
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": state, "global_step": 1000, "epoch": 3}, str(path))
    return path
