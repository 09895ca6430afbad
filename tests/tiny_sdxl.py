"""Tiny random-weight SDXL models built with diffusers/transformers: the SDXL parity oracles.

Two text encoders of different widths (CLIP-L-like quick_gelu; OpenCLIP-bigG-like gelu with a
projection, ``!`` padding and the legacy ``eos_token_id=2`` pooling, as SDXL's configs have), a
``text_time`` UNet with per-block transformer depth and head counts and linear projections, SDXL's
VAE scaling factor and Euler scheduler config. The refiner has only the second encoder and takes an
aesthetic score instead of the target size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tiny_models import build_unet, build_vae, randomize

from mlx_stablefused.demo import write_byte_level_tokenizer

SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "steps_offset": 1,
    "timestep_spacing": "leading", "interpolation_type": "linear", "prediction_type": "epsilon",
    "use_karras_sigmas": False, "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
    "clip_sample": False,
}
TEXT_1 = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=77, hidden_act="quick_gelu")
TEXT_2 = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=77, hidden_act="gelu", projection_dim=40)
TIME_DIM = 8  # addition_time_embed_dim


def unet_config(cross: int, pooled: int, time_ids: int, in_channels: int = 4) -> dict:
    """SDXL's UNet layout at toy size: no attention in the first block, transformer depth (1, 2) below."""
    return dict(block_out_channels=(16, 32, 32), layers_per_block=1, sample_size=8, in_channels=in_channels,
                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 2, 4), cross_attention_dim=cross,
                norm_num_groups=8, use_linear_projection=True, addition_embed_type="text_time",
                addition_time_embed_dim=TIME_DIM, projection_class_embeddings_input_dim=pooled + time_ids * TIME_DIM)


VAE = dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=4,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           sample_size=64, scaling_factor=0.13025, force_upcast=True)


@dataclass(frozen=True)
class SDXLSpec:
    name: str
    pipeline_class: str
    first_encoder: bool = True  # the refiner has only the second
    in_channels: int = 4  # 9: inpainting
    requires_aesthetics_score: bool = False

    @property
    def unet(self) -> dict:
        cross = (TEXT_1["hidden_size"] if self.first_encoder else 0) + TEXT_2["hidden_size"]
        ids = 5 if self.requires_aesthetics_score else 6
        return unet_config(cross, TEXT_2["projection_dim"], ids, self.in_channels)


BASE = SDXLSpec("sdxl", "StableDiffusionXLPipeline")
REFINER = SDXLSpec("sdxl-refiner", "StableDiffusionXLImg2ImgPipeline", first_encoder=False,
                   requires_aesthetics_score=True)
INPAINT = SDXLSpec("sdxl-inpaint", "StableDiffusionXLInpaintPipeline", in_channels=9)


def build_text_encoders(vocab_size: int, pad_id_1: int, pad_id_2: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    ids = dict(vocab_size=vocab_size, bos_token_id=vocab_size - 2)
    first = CLIPTextModel(CLIPTextConfig(**ids, eos_token_id=vocab_size - 1, pad_token_id=pad_id_1, **TEXT_1))
    second = CLIPTextModelWithProjection(CLIPTextConfig(**ids, eos_token_id=2, pad_token_id=pad_id_2, **TEXT_2))
    return randomize(first, 2), randomize(second, 3)


def build_sdxl(spec: SDXLSpec, folder: Path):
    """Save a complete diffusers SDXL pipeline folder; return the in-memory pipeline."""
    import diffusers
    from transformers import CLIPTokenizer

    tokenizers = []
    for i, pad in enumerate(("<|endoftext|>", "!")):
        tok_dir = folder / f"_tokenizer_src_{i}"
        vocab_size = write_byte_level_tokenizer(tok_dir, pad_token=pad)
        tokenizers.append(CLIPTokenizer.from_pretrained(str(tok_dir), pad_token=pad))
    first, second = build_text_encoders(vocab_size, tokenizers[0].pad_token_id, tokenizers[1].pad_token_id)
    scheduler = diffusers.EulerDiscreteScheduler.from_config(
        {k: v for k, v in SDXL_SCHEDULER.items() if k != "_class_name"})
    parts = dict(vae=build_vae(VAE), text_encoder_2=second, tokenizer_2=tokenizers[1], unet=build_unet(spec.unet, 4),
                 scheduler=scheduler)
    cls = getattr(diffusers, spec.pipeline_class)
    if spec.first_encoder:
        parts.update(text_encoder=first, tokenizer=tokenizers[0])
    else:
        parts.update(text_encoder=None, tokenizer=None)
    extra = {"requires_aesthetics_score": True} if spec.requires_aesthetics_score else {}
    pipe = cls(**parts, add_watermarker=False, force_zeros_for_empty_prompt=True, **extra)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(str(folder / "model"), safe_serialization=True)
    with open(folder / "model" / "scheduler" / "scheduler_config.json", "w") as f:
        json.dump({**SDXL_SCHEDULER, "_diffusers_version": "0.19.0"}, f)
    return pipe
