"""A tiny random-weight model that needs no network: the offline smoke test for the CLI and examples.

It has the Stable Diffusion architecture at toy size (a few hundred thousand parameters,
random weights, a byte-level tokenizer), so generation runs in seconds anywhere and
makes noise-like images. It proves the install works; it is not a generative model.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import pre_tokenizers

from . import __version__
from . import converted_format as fmt
from .checkpoint_io import atomic_directory, save_numpy_safetensors, write_json
from .config import MotionConfig, UNetConfig
from .errors import ModelSourceError
from .model_description import STABLE_DIFFUSION, UNET_2D
from .sources import SPECIAL_ID_PREFIX, cache_root

DEMO_MODEL_ID = SPECIAL_ID_PREFIX + "tiny-random"
DEMO_MOTION_ADAPTER_ID = SPECIAL_ID_PREFIX + "motion"
DEMO_IP_ADAPTER_ID = SPECIAL_ID_PREFIX + "ip-adapter"
DEMO_IP_ADAPTER_WEIGHTS = "ip-adapter_demo.safetensors"

DEMO_NOTICE = ("[mlx-stablefused] Using the built-in offline demo model: tiny, random weights. Its images are "
               "noise by design (a smoke test of the install). For real images pass a model, e.g. "
               "--model stable-diffusion-v1-5/stable-diffusion-v1-5")
DEMO_SIZE = 128  # the CLI's and examples' defaults on the demo model: its images are noise, so seconds suffice
DEMO_STEPS = 10
DEMO_VERSION = 3  # 3: weights drawn with numpy, so any installed backend builds the same model

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


def installed_networks() -> Any:
    """The loading side of whichever backend is installed (MLX first): the demo needs only its shapes."""
    try:
        from .backends.mlx.loading import NETWORKS

        return NETWORKS
    except ImportError:
        pass
    try:
        from .backends.torch.loading import TorchNetworks
    except ImportError as e:
        raise ImportError("the demo model needs MLX or PyTorch installed") from e
    return TorchNetworks("cpu")


def _diffusers_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    # Converted (MLX) kernels are (O, kh, kw, I); diffusers' are (O, I, kh, kw). Every other demo
    # parameter has the same element order in both layouts (a 1x1 convolution held as Linear included).
    if layout == fmt.LAYOUT and len(shape) == 4:
        return (shape[0], shape[3], shape[1], shape[2])
    if layout == fmt.LAYOUT and len(shape) not in (1, 2):
        raise ValueError(f"the demo has no rule for a {len(shape)}-D parameter in the {layout} layout")
    return shape


def demo_tensor(name: str, shape: tuple[int, ...], layout: str, seed: int) -> np.ndarray:
    """A deterministic initial value for parameter ``name`` of native ``shape``: norm scales 1, biases 0,
    other weights uniform in +-1/sqrt(fan_in), drawn in diffusers' layout so every backend gets the same."""
    if name.endswith(".bias"):
        return np.zeros(shape, np.float32)
    if len(shape) == 1:
        return np.ones(shape, np.float32)
    full = _diffusers_shape(shape, layout)
    bound = 1.0 / np.sqrt(np.prod(full[1:]))
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    value = rng.uniform(-bound, bound, full).astype(np.float32)
    return value.transpose(0, 2, 3, 1) if layout == fmt.LAYOUT and len(shape) == 4 else value


def _demo_weights(networks: Any, kind: Any, config: Any, seed: int, **extra: Any) -> dict[str, np.ndarray]:
    shapes = networks.parameter_shapes(networks.build(kind, config, **extra))
    return {k: demo_tensor(k, s, networks.layout, seed) for k, s in shapes.items()}


def build_demo_model(folder: str | Path, seed: int = 0) -> Path:
    """Write the demo model (atomically): a converted folder when MLX is installed, else a diffusers folder."""
    networks = installed_networks()
    converted = networks.layout == fmt.LAYOUT
    with atomic_directory(folder, overwrite=True) as tmp:
        vocab_size = write_byte_level_tokenizer(tmp / "tokenizer")
        write_json(tmp / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
        write_json(tmp / "model_index.json", {"_class_name": "StableDiffusionPipeline", "demo": True})
        for name, raw in demo_configs(vocab_size).items():
            component = STABLE_DIFFUSION.component(name)
            kind = component.kind_for(raw)
            weights = _demo_weights(networks, kind, kind.parse_config(raw), seed)
            write_json(tmp / component.folder / "config.json", raw)
            path = (fmt.weights_path(tmp, component.folder) if converted
                    else tmp / component.folder / f"{component.weight_stems[0]}.safetensors")
            save_numpy_safetensors(path, weights)
        if converted:
            write_json(tmp / fmt.MANIFEST_NAME, fmt.manifest(
                source=DEMO_MODEL_ID, dtype="float32", components=STABLE_DIFFUSION.names,
                converter_version=__version__, demo_version=DEMO_VERSION))
    return Path(folder)


def ensure_demo_model() -> Path:
    """Path of the demo model, built into the cache on first use."""
    folder = cache_root() / f"demo-v{DEMO_VERSION}"
    if not (folder / "model_index.json").is_file():
        build_demo_model(folder)
    return folder


def demo_motion_config() -> dict[str, Any]:
    unet = demo_configs(1)["unet"]
    return {"_class_name": "MotionAdapter", "block_out_channels": unet["block_out_channels"],
            "motion_layers_per_block": unet["layers_per_block"], "motion_num_attention_heads": 4,
            "motion_norm_num_groups": unet["norm_num_groups"], "motion_max_seq_length": 32,
            "use_motion_mid_block": False}


def ensure_demo_motion_adapter(seed: int = 1) -> Path:
    """A random motion adapter for the demo model (diffusers MotionAdapter layout), built on first use.

    Its tensors are the motion modules of the demo UNet built with this adapter's config."""
    folder = cache_root() / f"demo-motion-v{DEMO_VERSION}"
    if (folder / "config.json").is_file():
        return folder
    networks, config = installed_networks(), demo_motion_config()
    unet = UNetConfig.from_dict(demo_configs(1)["unet"])
    shapes = networks.parameter_shapes(networks.build(UNET_2D, unet, motion=MotionConfig.from_dict(config)))
    weights = {k: demo_tensor(k, s, "diffusers", seed) for k, s in shapes.items() if ".motion_modules." in k}
    with atomic_directory(folder, overwrite=True) as tmp:
        save_numpy_safetensors(tmp / "diffusion_pytorch_model.safetensors", weights)
        write_json(tmp / "config.json", config)
    return folder


def demo_controlnet_config() -> dict[str, Any]:
    """A ControlNet fitting the demo UNet (its widths, blocks, cross-attention); control images at 8x its latents."""
    unet = demo_configs(1)["unet"]
    keep = ("block_out_channels", "down_block_types", "layers_per_block", "attention_head_dim", "cross_attention_dim",
            "norm_num_groups", "in_channels")
    return {"_class_name": "ControlNetModel", **{k: unet[k] for k in keep}, "use_linear_projection": True,
            "conditioning_embedding_out_channels": [8, 16, 16, 32]}


def ensure_demo_controlnet(seed: int = 2) -> Path:
    """A random ControlNet for the demo model (a diffusers ControlNetModel folder), built on first use."""
    from .model_description import CONTROLNET_MODEL

    folder = cache_root() / f"demo-controlnet-v{DEMO_VERSION}"
    if (folder / "config.json").is_file():
        return folder
    networks, config = installed_networks(), demo_controlnet_config()
    shapes = networks.parameter_shapes(networks.build(CONTROLNET_MODEL, CONTROLNET_MODEL.parse_config(config)))
    def diffusers_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        if networks.layout == fmt.LAYOUT and name.endswith("conv_shortcut.weight") and len(shape) == 2:
            return (*shape, 1, 1)  # a 1x1 convolution, which the MLX modules hold as Linear
        return _diffusers_shape(shape, networks.layout)

    weights = {k: demo_tensor(k, diffusers_shape(k, s), "diffusers", seed) for k, s in shapes.items()}
    with atomic_directory(folder, overwrite=True) as tmp:
        save_numpy_safetensors(tmp / "diffusion_pytorch_model.safetensors", weights)
        write_json(tmp / "config.json", config)
    return folder


def demo_image_encoder_config() -> dict[str, Any]:
    """A toy CLIPVisionModelWithProjection (transformers' config.json) for the demo IP-Adapter."""
    return {"architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model",
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "image_size": 32, "patch_size": 8, "num_channels": 3, "projection_dim": 32, "hidden_act": "gelu",
            "layer_norm_eps": 1e-5}


def ensure_demo_ip_adapter(seed: int = 2) -> Path:
    """A random IP-Adapter for the demo model in h94/IP-Adapter's layout (``ip-adapter_demo.safetensors`` with
    ``image_proj.*`` and ``ip_adapter.<id>.to_k_ip/to_v_ip.weight``, and ``image_encoder/``), built on first use."""
    from .config import CLIPVisionConfig
    from .ip_adapter import TOKENS_PER_IMAGE, cross_attention_slots
    from .model_description import IMAGE_ENCODER
    from .topology import unet_plan

    folder = cache_root() / f"demo-ip-adapter-v{DEMO_VERSION}"
    if (folder / DEMO_IP_ADAPTER_WEIGHTS).is_file():
        return folder
    networks, raw = installed_networks(), demo_image_encoder_config()
    kind = IMAGE_ENCODER.component("image_encoder").kinds[0]
    shapes = networks.parameter_shapes(networks.build(kind, CLIPVisionConfig.from_dict(raw)))
    encoder = {k: demo_tensor(k, _diffusers_shape(s, networks.layout), "diffusers", seed) for k, s in shapes.items()}
    unet = UNetConfig.from_dict(demo_configs(1)["unet"])
    cross, embed = unet.cross_attention_dim, raw["projection_dim"]
    tokens = TOKENS_PER_IMAGE * cross
    adapter = {"image_proj.proj.weight": (tokens, embed), "image_proj.proj.bias": (tokens,),
               "image_proj.norm.weight": (cross,), "image_proj.norm.bias": (cross,)}
    for slot in cross_attention_slots(unet_plan(unet)):
        adapter.update({f"ip_adapter.{slot.key_id}.{name}.weight": (slot.inner, cross)
                        for name in ("to_k_ip", "to_v_ip")})
    with atomic_directory(folder, overwrite=True) as tmp:
        save_numpy_safetensors(tmp / DEMO_IP_ADAPTER_WEIGHTS,
                               {k: demo_tensor(k, s, "diffusers", seed) for k, s in adapter.items()})
        write_json(tmp / "image_encoder" / "config.json", raw)
        save_numpy_safetensors(tmp / "image_encoder" / "model.safetensors", encoder)
    return folder


DEMO_CONTROLNET_ID = SPECIAL_ID_PREFIX + "controlnet"
SPECIAL_IDS = {DEMO_MODEL_ID: ensure_demo_model, DEMO_MOTION_ADAPTER_ID: ensure_demo_motion_adapter,
               DEMO_IP_ADAPTER_ID: ensure_demo_ip_adapter, DEMO_CONTROLNET_ID: ensure_demo_controlnet}


def resolve_special_id(spec: Any) -> Any:
    """The folder of a special id (``demo:tiny-random``, ``demo:motion``), built on first use; anything
    else unchanged. The entry layer (pipelines, CLI) calls this before resolving a model or adapter."""
    if not isinstance(spec, str) or not spec.startswith(SPECIAL_ID_PREFIX):
        return spec
    if spec not in SPECIAL_IDS:
        raise ModelSourceError(f"unknown special id {spec!r}; known: {', '.join(SPECIAL_IDS)}")
    return SPECIAL_IDS[spec]()


def resolve_special_adapter(adapter: Any) -> Any:
    """The files of a motion adapter named by a special id (``demo:motion``, which ``resolve_motion_adapter``
    only recognises); any other adapter source unchanged."""
    from .motion_adapters import MotionAdapterSource, resolve_motion_adapter

    if not isinstance(adapter, MotionAdapterSource) or adapter.files or adapter.origin not in SPECIAL_IDS:
        return adapter
    return resolve_motion_adapter(resolve_special_id(adapter.origin), config=dict(adapter.overrides) or None)
