"""Full-size Stable Diffusion architectures with random weights, as diffusers folders, for the benchmarks.

Memory and speed depend on the architecture, not on the weights' values, so these stand in for the real
checkpoints (which this machine cannot download). The text encoders keep CLIP's full 49408-row token
table (the memory of the real one) behind a small byte-level tokenizer whose ids fall inside it.

    python benchmarks/random_models.py sd15 ~/.cache/mlx-stablefused/bench-sd15-full
    python benchmarks/random_models.py sdxl ~/.cache/mlx-stablefused/bench-sdxl-random
    python benchmarks/random_models.py sd21 ~/.cache/mlx-stablefused/bench-sd21-random

SDXL is built and saved one component at a time in float16 (2.6 B UNet parameters: 5.2 GB; float32 would
be 10 GB), with diffusers' own initialisation; its VAE is the fp16-safe kind (``force_upcast`` False, as
madebyollin/sdxl-vae-fp16-fix), the VAE a Mac user runs SDXL in fp16 with.
"""

from __future__ import annotations

import gc
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLIP_VOCAB = 49408

SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu")
OPENCLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                     max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
OPENCLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                  max_position_embeddings=77, hidden_act="gelu", projection_dim=512)  # SD 2.x: the penultimate layer's 23
SD21_UNET = dict(sample_size=64, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True, cross_attention_dim=1024)
SD21_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, prediction_type="epsilon")
SDXL_UNET = dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
SDXL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                      timestep_spacing="leading", prediction_type="epsilon")


def _tokenizer(folder: Path, pad: str):
    from transformers import CLIPTokenizer

    sys.path.insert(0, str(ROOT))
    from mlx_stablefused.demo import write_byte_level_tokenizer

    size = write_byte_level_tokenizer(folder / "_tok", pad_token=pad)
    return CLIPTokenizer.from_pretrained(str(folder / "_tok"), pad_token=pad), size


def _save(module, folder: Path) -> None:
    module.save_pretrained(str(folder), safe_serialization=True)
    del module
    gc.collect()


def _model_index(folder: Path, cls: str, parts: dict[str, tuple[str, str]], **extra) -> None:
    index = {"_class_name": cls, "_diffusers_version": "0.30.0", **extra,
             **{name: list(lib_cls) for name, lib_cls in parts.items()}}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def _sd_model_index(folder: Path, scheduler: str) -> None:
    """An SD 1.x / 2.x pipeline's model_index.json (no safety checker), with ``scheduler`` as its scheduler class."""
    _model_index(folder, "StableDiffusionPipeline", {
        "text_encoder": ("transformers", "CLIPTextModel"), "tokenizer": ("transformers", "CLIPTokenizer"),
        "unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL"),
        "scheduler": ("diffusers", scheduler), "safety_checker": (None, None),
        "feature_extractor": (None, None)}, requires_safety_checker=False)


def build_sd15(folder: Path) -> None:
    """SD 1.5: CLIP-L text encoder, diffusers' default UNet (cross-attention 768), the SD VAE; float32."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, str(ROOT))
    from mlx_stablefused.checkpoint_io import atomic_directory

    torch.manual_seed(0)
    with atomic_directory(folder, overwrite=True) as tmp:
        tok, size = _tokenizer(tmp, "<|endoftext|>")
        tok.save_pretrained(str(tmp / "tokenizer"))
        _save(CLIPTextModel(CLIPTextConfig(vocab_size=CLIP_VOCAB, eos_token_id=size - 1, bos_token_id=size - 2,
                                           **CLIP_L)), tmp / "text_encoder")
        _save(UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8), tmp / "unet")
        _save(AutoencoderKL(**SD_VAE, sample_size=512), tmp / "vae")
        DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                      set_alpha_to_one=False, steps_offset=1).save_pretrained(str(tmp / "scheduler"))
        _sd_model_index(tmp, "DDIMScheduler")


def build_sd21(folder: Path) -> None:
    """SD 2.1-base (stabilityai/stable-diffusion-2-1-base's configs): OpenCLIP-H text encoder (1024 wide, 23
    layers, GELU, "!" padding), the linear-projection UNet with (5, 10, 20, 20) heads and 1024-wide cross
    attention, the SD VAE, its PNDM scheduler config (epsilon prediction); float32."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, str(ROOT))
    from mlx_stablefused.checkpoint_io import atomic_directory

    torch.manual_seed(0)
    with atomic_directory(folder, overwrite=True) as tmp:
        tok, size = _tokenizer(tmp, "!")
        tok.save_pretrained(str(tmp / "tokenizer"))
        for name in ("vocab.json", "merges.txt"):  # the hub repo's files too (mlx-examples' tokenizer reads these)
            shutil.copy(tmp / "_tok" / name, tmp / "tokenizer" / name)
        _save(CLIPTextModel(CLIPTextConfig(vocab_size=CLIP_VOCAB, eos_token_id=size - 1, bos_token_id=size - 2,
                                           pad_token_id=tok.pad_token_id, **OPENCLIP_H)), tmp / "text_encoder")
        _save(UNet2DConditionModel(**SD21_UNET), tmp / "unet")
        _save(AutoencoderKL(**SD_VAE, sample_size=512), tmp / "vae")
        PNDMScheduler(**SD21_SCHEDULER).save_pretrained(str(tmp / "scheduler"))
        _sd_model_index(tmp, "PNDMScheduler")


def build_sdxl(folder: Path) -> None:
    """SDXL base 1.0's architecture (CLIP-L + OpenCLIP-bigG with projection, the text_time UNet), float16."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    sys.path.insert(0, str(ROOT))
    from mlx_stablefused.checkpoint_io import atomic_directory

    torch.manual_seed(0)
    torch.set_default_dtype(torch.float16)
    with atomic_directory(folder, overwrite=True) as tmp:
        tok_1, size = _tokenizer(tmp / "t1", "<|endoftext|>")
        tok_2, _ = _tokenizer(tmp / "t2", "!")
        tok_1.save_pretrained(str(tmp / "tokenizer"))
        tok_2.save_pretrained(str(tmp / "tokenizer_2"))
        ids = dict(vocab_size=CLIP_VOCAB, bos_token_id=size - 2)
        _save(CLIPTextModel(CLIPTextConfig(**ids, eos_token_id=size - 1, pad_token_id=tok_1.pad_token_id,
                                           **CLIP_L)), tmp / "text_encoder")
        _save(CLIPTextModelWithProjection(CLIPTextConfig(**ids, eos_token_id=2, pad_token_id=tok_2.pad_token_id,
                                                         **OPENCLIP_BIGG)), tmp / "text_encoder_2")
        _save(UNet2DConditionModel(**SDXL_UNET), tmp / "unet")
        _save(AutoencoderKL(**SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=False), tmp / "vae")
        EulerDiscreteScheduler(**SDXL_SCHEDULER).save_pretrained(str(tmp / "scheduler"))
        _model_index(tmp, "StableDiffusionXLPipeline", {
            "text_encoder": ("transformers", "CLIPTextModel"), "tokenizer": ("transformers", "CLIPTokenizer"),
            "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
            "tokenizer_2": ("transformers", "CLIPTokenizer"), "unet": ("diffusers", "UNet2DConditionModel"),
            "vae": ("diffusers", "AutoencoderKL"), "scheduler": ("diffusers", "EulerDiscreteScheduler")},
            force_zeros_for_empty_prompt=True)
    torch.set_default_dtype(torch.float32)


BUILDERS = {"sd15": build_sd15, "sd21": build_sd21, "sdxl": build_sdxl}

if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in BUILDERS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(BUILDERS)}}} FOLDER")
    BUILDERS[sys.argv[1]](Path(sys.argv[2]).expanduser())
