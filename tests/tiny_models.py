"""Tiny random-weight Stable Diffusion models built with diffusers/transformers: the parity oracles.

Every parameter is randomised (norm scales near 1, everything else small Gaussian), with
several channels per GroupNorm group, so that no weight sits at a trivial default and
grouping order, biases and norms are all exercised.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mlx_stablefused.demo import write_byte_level_tokenizer

SD1_SCHEDULER = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "clip_sample": False, "trained_betas": None,
}
SD2_SCHEDULER = {
    "_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "clip_sample": False, "prediction_type": "v_prediction", "trained_betas": None,
}


@dataclass
class TinySpec:
    name: str
    unet: dict
    vae: dict
    text: dict
    scheduler: dict
    pad_token: str = "<|endoftext|>"
    extra: dict = field(default_factory=dict)


SD1 = TinySpec(
    name="sd1",
    unet=dict(block_out_channels=(16, 32, 32), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
              down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
              cross_attention_dim=32, attention_head_dim=2, norm_num_groups=4, use_linear_projection=False),
    vae=dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=4,
             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
             sample_size=64),
    text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=77, hidden_act="quick_gelu"),
    scheduler=SD1_SCHEDULER,
)

SD2 = TinySpec(
    name="sd2",
    unet=dict(block_out_channels=(16, 32, 48), layers_per_block=(1, 2, 1), sample_size=8, in_channels=4,
              out_channels=4,
              down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
              cross_attention_dim=32, attention_head_dim=(2, 4, 8), norm_num_groups=8,
              use_linear_projection=True, upcast_attention=True, transformer_layers_per_block=(1, 2, 1)),
    vae=dict(block_out_channels=(16, 32, 32, 32), layers_per_block=2, latent_channels=4, norm_num_groups=8,
             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
             sample_size=64, scaling_factor=0.5),
    text=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
              max_position_embeddings=77, hidden_act="gelu"),
    scheduler=SD2_SCHEDULER,
    pad_token="!",
)

INPAINT_UNET = dict(SD1.unet, in_channels=9)


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            for name, p in m.named_parameters(recurse=False):
                r = torch.randn(p.shape, generator=g)
                if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and name == "weight":
                    p.copy_(1.0 + 0.1 * r)
                elif isinstance(m, torch.nn.Embedding):
                    p.copy_(0.5 * r)
                else:
                    p.copy_(0.1 * r / max(1.0, (p[0].numel() / 16) ** 0.5) if p.ndim > 1 else 0.05 * r)
    return module.eval()


def build_unet(cfg: dict, seed: int = 0):
    from diffusers import UNet2DConditionModel

    return randomize(UNet2DConditionModel(**cfg), seed)


def build_vae(cfg: dict, seed: int = 1):
    from diffusers import AutoencoderKL

    return randomize(AutoencoderKL(**cfg), seed)


def build_text_encoder(cfg: dict, vocab_size: int, pad_id: int, seed: int = 2):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=vocab_size, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                            pad_token_id=pad_id, **cfg)
    return randomize(CLIPTextModel(config), seed)


def build_pipeline(spec: TinySpec, folder: Path, unet: dict | None = None, pipeline_class: str = "StableDiffusionPipeline"):
    """Save a complete diffusers pipeline folder; return the in-memory pipeline."""
    import diffusers
    from diffusers import DDIMScheduler, PNDMScheduler
    from transformers import CLIPTokenizer

    StableDiffusionPipeline = getattr(diffusers, pipeline_class)

    tok_dir = folder / "_tokenizer_src"
    vocab_size = write_byte_level_tokenizer(tok_dir, pad_token=spec.pad_token)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), pad_token=spec.pad_token)
    pad_id = tokenizer.pad_token_id
    scheduler_cls = {"PNDMScheduler": PNDMScheduler, "DDIMScheduler": DDIMScheduler}[spec.scheduler["_class_name"]]
    scheduler = scheduler_cls.from_config({k: v for k, v in spec.scheduler.items() if k != "_class_name"})
    pipe = StableDiffusionPipeline(
        vae=build_vae(spec.vae), text_encoder=build_text_encoder(spec.text, vocab_size, pad_id),
        tokenizer=tokenizer, unet=build_unet(unet or spec.unet), scheduler=scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(str(folder / "model"), safe_serialization=True)
    # Write the scheduler config as the hub's SD repos have it (few keys, old diffusers), so that
    # samplers must fill missing keys with their own class defaults, as diffusers' from_config does.
    with open(folder / "model" / "scheduler" / "scheduler_config.json", "w") as f:
        json.dump({**spec.scheduler, "_diffusers_version": "0.6.0"}, f)
    return pipe


def build_motion_adapter(use_mid_block: bool, seed: int = 7, max_seq_length: int = 32):
    """A MotionAdapter fitting the SD1 tiny UNet, every parameter (proj_out too) randomised."""
    from diffusers import MotionAdapter

    adapter = MotionAdapter(block_out_channels=SD1.unet["block_out_channels"], motion_layers_per_block=2,
                            motion_num_attention_heads=2, motion_norm_num_groups=4,
                            motion_max_seq_length=max_seq_length, use_motion_mid_block=use_mid_block)
    return randomize(adapter, seed)


def to_original_format(state: dict, pe_length: int) -> dict:
    """diffusers MotionAdapter keys -> the original AnimateDiff checkpoint naming (inverse of §4.2)."""
    import re

    out = {}
    for key, value in state.items():
        if key.endswith("pos_embed.pe"):
            continue
        m = re.match(r"(.*motion_modules\.\d+)\.(.*)", key)
        prefix, rest = m.group(1), m.group(2)
        rest = (rest.replace(".attn1.", ".attention_blocks.0.").replace(".attn2.", ".attention_blocks.1.")
                .replace(".norm1.", ".norms.0.").replace(".norm2.", ".norms.1.").replace(".norm3.", ".ff_norm."))
        out[f"{prefix}.temporal_transformer.{rest}"] = value
        if rest.startswith("transformer_blocks.") and rest.endswith("attention_blocks.0.to_q.weight"):
            block = rest.split(".attention_blocks")[0]
            dim = value.shape[0]
            for a in (0, 1):
                out[f"{prefix}.temporal_transformer.{block}.attention_blocks.{a}.pos_encoder.pe"] = \
                    torch.zeros(1, pe_length, dim)
    return out


UNET3D = dict(block_out_channels=(16, 32), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
              down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D",
                                                                                       "CrossAttnUpBlock3D"),
              cross_attention_dim=32, attention_head_dim=8, norm_num_groups=4)


def build_unet3d(cfg: dict = UNET3D, seed: int = 11):
    from diffusers import UNet3DConditionModel

    return randomize(UNet3DConditionModel(**cfg), seed)


def build_video_pipeline(folder: Path):
    """A TextToVideoSDPipeline (ModelScope-style) around the SD1 tiny VAE/CLIP and a tiny UNet3D."""
    from diffusers import DPMSolverMultistepScheduler, TextToVideoSDPipeline
    from transformers import CLIPTokenizer

    tok_dir = folder / "_tokenizer_src"
    vocab_size = write_byte_level_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    scheduler = DPMSolverMultistepScheduler.from_config(
        {k: v for k, v in SD2_SCHEDULER.items() if k != "_class_name"} | {"prediction_type": "epsilon"})
    pipe = TextToVideoSDPipeline(vae=build_vae(SD1.vae), text_encoder=build_text_encoder(SD1.text, vocab_size,
                                                                                        tokenizer.pad_token_id),
                                 tokenizer=tokenizer, unet=build_unet3d(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(str(folder / "model"), safe_serialization=True)
    return pipe
