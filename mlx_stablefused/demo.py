"""A tiny random-weight model that needs no network: the offline smoke test for the CLI and examples.

It has the Stable Diffusion architecture at toy size (a few hundred thousand parameters,
random weights, a byte-level tokenizer), so generation runs in seconds anywhere and
makes noise-like images. It proves the install works; it is not a generative model.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import pre_tokenizers

from . import __version__
from .checkpoint_io import atomic_directory, save_safetensors, write_json
from .sources import DEMO_MODEL_ID, MANIFEST_NAME

DEMO_NOTICE = ("[mlx-stablefused] Using the built-in offline demo model: tiny, random weights. Its images are "
               "noise by design (a smoke test of the install). For real images pass a model, e.g. "
               "--model stable-diffusion-v1-5/stable-diffusion-v1-5")
DEMO_VERSION = 2

# A few merges so the tokenizer exercises BPE, not only single bytes.
_DEMO_MERGES = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("o", "f</w>"), ("i", "n"),
                ("in", "g</w>"), ("e", "r</w>"), ("o", "n</w>")]

SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
}


def write_byte_level_tokenizer(folder: str | Path, pad_token: str = "<|endoftext|>") -> int:
    """Write a small but complete CLIP-format BPE tokenizer (every byte, a few merges); return its size."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    tokens += ["".join(m) for m in _DEMO_MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    with open(folder / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(folder / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _DEMO_MERGES))
    with open(folder / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump({"model_max_length": 77, "pad_token": pad_token, "bos_token": "<|startoftext|>",
                   "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}, f)
    return len(vocab)


def demo_configs(vocab_size: int) -> dict[str, dict]:
    return {
        "text_encoder": {"vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64,
                         "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 77,
                         "hidden_act": "quick_gelu", "eos_token_id": vocab_size - 1},
        "unet": {"in_channels": 4, "out_channels": 4, "block_out_channels": [32, 64],
                 # Attention only at the lower resolution keeps the CPU smoke test fast.
                 "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                 "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "layers_per_block": 1,
                 "attention_head_dim": 4, "cross_attention_dim": 32, "norm_num_groups": 8, "sample_size": 32},
        "vae": {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [16, 32, 32, 32],
                "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
                "layers_per_block": 1, "norm_num_groups": 8, "scaling_factor": 0.18215,
                "mid_block_add_attention": False},
    }


def build_demo_model(folder: str | Path, seed: int = 0) -> Path:
    """Write the demo model as a converted MLX folder (atomically)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from .backends.mlx.loading import SPECS

    mx.random.seed(seed)
    with atomic_directory(folder, overwrite=True) as tmp:
        vocab_size = write_byte_level_tokenizer(tmp / "tokenizer")
        write_json(tmp / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
        write_json(tmp / "model_index.json", {"_class_name": "StableDiffusionPipeline", "demo": True})
        for component, cfg in demo_configs(vocab_size).items():
            spec = SPECS[component]
            model = spec.build(spec.parse_config(cfg))
            write_json(tmp / component / "config.json", cfg)
            save_safetensors(tmp / component / "weights.safetensors", dict(tree_flatten(model.parameters())))
        write_json(tmp / MANIFEST_NAME, {"format": "mlx-stablefused", "format_version": 1,
                                          "converter_version": __version__, "source": DEMO_MODEL_ID,
                                          "dtype": "float32", "demo_version": DEMO_VERSION})
    return Path(folder)


def ensure_demo_model() -> Path:
    """Path of the demo model, built into the cache on first use."""
    from .sources import cache_root

    folder = cache_root() / f"demo-v{DEMO_VERSION}"
    if not (folder / MANIFEST_NAME).is_file():
        build_demo_model(folder)
    return folder


DEMO_MOTION_ADAPTER_ID = "demo:motion"


def ensure_demo_motion_adapter() -> Path:
    """A random motion adapter for the demo model (diffusers MotionAdapter layout), built on first use."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from .backends.mlx.motion import AnimateDiffTransformer3D
    from .sources import cache_root

    folder = cache_root() / f"demo-motion-v{DEMO_VERSION}"
    if (folder / "config.json").is_file():
        return folder
    unet = demo_configs(1)["unet"]
    channels, groups, heads = unet["block_out_channels"], unet["norm_num_groups"], 4
    mx.random.seed(1)
    weights = {}
    count = {"down_blocks": unet["layers_per_block"], "up_blocks": unet["layers_per_block"] + 1}
    for kind, per_block in count.items():
        order = channels if kind == "down_blocks" else channels[::-1]
        for i, c in enumerate(order):
            for j in range(per_block):
                module = AnimateDiffTransformer3D(c, heads, 1, groups, 32)
                weights.update({f"{kind}.{i}.motion_modules.{j}.{k}": v for k, v in tree_flatten(module.parameters())})
    config = {"_class_name": "MotionAdapter", "block_out_channels": channels,
              "motion_layers_per_block": unet["layers_per_block"], "motion_num_attention_heads": heads,
              "motion_norm_num_groups": groups, "motion_max_seq_length": 32, "use_motion_mid_block": False}
    with atomic_directory(folder, overwrite=True) as tmp:
        save_safetensors(tmp / "diffusion_pytorch_model.safetensors", weights)
        write_json(tmp / "config.json", config)
    return folder
