"""What a model is made of, as data: components, their folders, configs, weight files, key rules, dtypes.

The resolver (``sources``), both backends' loaders, the converter and the demo all read a
``ModelDescription``; none of them names a component. A new network (a second text encoder, a
ControlNet, an image encoder) is one more ``Component`` here and one module class registered per
backend under its ``ModuleKind.class_name``. This module imports no framework.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Mapping

from .config import (AutoencoderTinyConfig, CLIPTextConfig, CLIPVisionConfig, ControlNetConfig, UNet3DConfig,
                     UNetConfig, VAEConfig)
from .weights import Rule


@dataclass(frozen=True)
class ModuleKind:
    """One network class: the diffusers / transformers class name (each backend's registry key), the
    parser of its ``config.json``, and the rules mapping its checkpoint keys onto our parameter names."""

    class_name: str
    parse_config: Callable[[dict], Any]
    rules: tuple[Rule, ...] = ()
    takes_motion_adapter: bool = False  # an AnimateDiff adapter merges into this network


def same_dtype(config: Any, dtype: str) -> str:
    return dtype


def upcast_fp16_vae(config: Any, dtype: str) -> str:
    """fp16 SD VAEs overflow; diffusers runs them in fp32 when the config asks (``force_upcast``).
    bfloat16 has the range and stays."""
    return "float32" if dtype == "float16" and getattr(config, "force_upcast", False) else dtype


@dataclass(frozen=True)
class Component:
    """One sub-folder of a diffusers model that holds a network.

    ``kinds``: the first is the default; another is chosen when the config's ``_class_name`` names it
    (a UNet3D in the ``unet`` folder). ``weight_stems``: the safetensors and the PyTorch-pickle file
    stems as diffusers / transformers save them. ``tokenizer``: the folder of the tokenizer that feeds
    this text encoder. ``role``: what the pipelines use it for (several components may share one)."""

    name: str
    role: str
    kinds: tuple[ModuleKind, ...]
    weight_stems: tuple[str, str]
    tokenizer: str | None = None
    dtype_policy: Callable[[Any, str], str] = same_dtype
    subfolder: str | None = None  # where it lives when not in the folder of its name ("." : the root itself)

    @property
    def folder(self) -> str:
        return self.name if self.subfolder is None else self.subfolder

    def path(self, name: str) -> str:
        """``name`` inside this component's folder, relative to the model root (as a hub repo lists it)."""
        return name if self.folder == "." else f"{self.folder}/{name}"

    def kind_for(self, raw_config: Mapping[str, Any]) -> ModuleKind:
        architectures = raw_config.get("architectures")  # transformers configs name their class here
        named = raw_config.get("_class_name") or (architectures[0] if isinstance(architectures, list)
                                                  and architectures else None)
        return next((k for k in self.kinds if k.class_name == named), self.kinds[0])

    def weight_candidates(self, variant: str | None) -> list[str]:
        """Weight file names, best first; a ``*.index.json`` name is a shard index."""
        st, pt = self.weight_stems
        names: list[str] = []
        if variant:
            names += [f"{st}.{variant}.safetensors", f"{st}.safetensors.index.{variant}.json",
                      f"{pt}.{variant}.bin", f"{pt}.bin.index.{variant}.json"]
        return names + [f"{st}.safetensors", f"{st}.safetensors.index.json", f"{pt}.bin", f"{pt}.bin.index.json"]


@dataclass(frozen=True)
class ModelDescription:
    """A model: its components in load order and the support files the pipelines read."""

    name: str
    components: tuple[Component, ...]
    support_files: tuple[str, ...] = ("model_index.json", "scheduler/scheduler_config.json")
    tokenizer_files: tuple[str, ...] = ("*",)

    def __post_init__(self) -> None:
        names = [c.name for c in self.components]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name}: component names repeat: {names}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.components)

    def component(self, name: str) -> Component:
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(f"{self.name} has no component {name!r} (has {list(self.names)})")

    def first_with_role(self, role: str) -> Component | None:
        return next((c for c in self.components if c.role == role), None)

    @property
    def tokenizers(self) -> dict[str, str]:
        """Text-encoder component -> the tokenizer folder that feeds it."""
        return {c.name: c.tokenizer for c in self.components if c.tokenizer}

    def hub_support_patterns(self) -> list[str]:
        """What to download besides the weight files: configs, tokenizers, scheduler, model index."""
        tokenizer_globs = [f"{t}/{g}" for t in dict.fromkeys(self.tokenizers.values()) for g in self.tokenizer_files]
        return [*self.support_files, *tokenizer_globs,
                *(c.path("config.json") for c in self.components)]

    def adding(self, *components: Component) -> "ModelDescription":
        """This description with more components (e.g. an SDXL second text encoder)."""
        return replace(self, components=self.components + tuple(components))

    def only(self, names: Iterable[str], name: str | None = None) -> "ModelDescription":
        """This description with only the components in ``names`` (the SDXL refiner has no first text encoder)."""
        keep = set(names)
        return replace(self, name=name or self.name, components=tuple(c for c in self.components if c.name in keep))


def _vae_attention_rules() -> tuple[Rule, ...]:
    # Old diffusers checkpoints name the VAE mid-block attention query/key/value/proj_attn.
    return tuple(Rule(rf"(.*\.attentions\.\d+)\.{old}\.(weight|bias)", rf"\1.{new}.\2")
                 for old, new in (("query", "to_q"), ("key", "to_k"), ("value", "to_v"), ("proj_attn", "to_out.0")))


CLIP_TEXT_MODEL = ModuleKind("CLIPTextModel", CLIPTextConfig.from_dict, rules=(
    Rule(r"(text_model\.)?embeddings\.position_ids", None),
    # transformers >= 5 saves CLIPTextModel without the ``text_model.`` prefix.
    Rule(r"((?:embeddings|encoder|final_layer_norm)\..*)", r"text_model.\1"),
))
# SDXL's second text encoder (OpenCLIP bigG); transformers saves it with the same key layout plus text_projection.
CLIP_TEXT_MODEL_WITH_PROJECTION = ModuleKind("CLIPTextModelWithProjection", CLIPTextConfig.from_dict,
                                             rules=CLIP_TEXT_MODEL.rules)
UNET_2D = ModuleKind("UNet2DConditionModel", UNetConfig.from_dict, takes_motion_adapter=True)
UNET_3D = ModuleKind("UNet3DConditionModel", UNet3DConfig.from_dict)
AUTOENCODER_KL = ModuleKind("AutoencoderKL", VAEConfig.from_dict, rules=_vae_attention_rules())

TRANSFORMERS_STEMS = ("model", "pytorch_model")
DIFFUSERS_STEMS = ("diffusion_pytorch_model", "diffusion_pytorch_model")

# Stable Diffusion 1.x / 2.x, and ModelScope / Zeroscope (a UNet3D in the unet folder).
STABLE_DIFFUSION = ModelDescription("Stable Diffusion", (
    Component("text_encoder", "text_encoder", (CLIP_TEXT_MODEL,), TRANSFORMERS_STEMS, tokenizer="tokenizer"),
    Component("unet", "unet", (UNET_2D, UNET_3D), DIFFUSERS_STEMS),
    Component("vae", "vae", (AUTOENCODER_KL,), DIFFUSERS_STEMS, dtype_policy=upcast_fp16_vae),
))


# SDXL base / Turbo / inpainting: CLIP-L (penultimate hidden states) and OpenCLIP-bigG with projection
# (penultimate hidden states and the pooled ``text_embeds``), a text_time UNet. Both encoders have the role
# "text_encoder", in the order their states are concatenated; the last one gives the pooled embedding.
STABLE_DIFFUSION_XL = ModelDescription("Stable Diffusion XL", (
    Component("text_encoder", "text_encoder", (CLIP_TEXT_MODEL,), TRANSFORMERS_STEMS, tokenizer="tokenizer"),
    Component("text_encoder_2", "text_encoder", (CLIP_TEXT_MODEL_WITH_PROJECTION, CLIP_TEXT_MODEL),
              TRANSFORMERS_STEMS, tokenizer="tokenizer_2"),
    Component("unet", "unet", (UNET_2D,), DIFFUSERS_STEMS),
    Component("vae", "vae", (AUTOENCODER_KL,), DIFFUSERS_STEMS, dtype_policy=upcast_fp16_vae),
))
SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")


def description_for(model_index: Mapping[str, Any]) -> ModelDescription:
    """The description a ``model_index.json`` names: SDXL for diffusers' SDXL pipelines, with the components
    the index lists (the refiner's ``text_encoder`` is ``[null, null]``); Stable Diffusion otherwise."""
    if model_index.get("_class_name") not in SDXL_PIPELINES:
        return STABLE_DIFFUSION
    present = [c.name for c in STABLE_DIFFUSION_XL.components
               if isinstance(model_index.get(c.name), list) and any(model_index[c.name])]
    if "text_encoder_2" not in present and "text_encoder" not in present:
        present += ["text_encoder", "text_encoder_2"]  # an index without entries: the full base model
    present += [n for n in ("unet", "vae") if n not in present]
    name = STABLE_DIFFUSION_XL.name + ("" if "text_encoder" in present else " refiner")
    return STABLE_DIFFUSION_XL.only(present, name)

# TAESD / TAESDXL (diffusers' AutoencoderTiny), a model of its own: config.json and weights at the folder's root.
AUTOENCODER_TINY = ModuleKind("AutoencoderTiny", AutoencoderTinyConfig.from_dict)
TINY_AUTOENCODER = ModelDescription("Tiny autoencoder (TAESD)", (
    Component("tiny_vae", "preview_vae", (AUTOENCODER_TINY,), DIFFUSERS_STEMS, subfolder="."),
), support_files=())

# An IP-Adapter's image encoder (transformers' CLIPVisionModelWithProjection), a model of its own: the
# ``image_encoder`` folder beside the adapter's weight file, config.json and weights at its root.
CLIP_VISION_MODEL_WITH_PROJECTION = ModuleKind("CLIPVisionModelWithProjection", CLIPVisionConfig.from_dict, rules=(
    Rule(r"(vision_model\.)?embeddings\.position_ids", None),
    Rule(r"((?:embeddings|pre_layrnorm|encoder|post_layernorm)\..*)", r"vision_model.\1"),  # unprefixed saves
))
IMAGE_ENCODER = ModelDescription("IP-Adapter image encoder (CLIP vision)", (
    Component("image_encoder", "image_encoder", (CLIP_VISION_MODEL_WITH_PROJECTION,), TRANSFORMERS_STEMS,
              subfolder="."),
), support_files=())

# A ControlNet (diffusers' ControlNetModel), a model of its own: config.json and weights at the folder's root.
CONTROLNET_MODEL = ModuleKind("ControlNetModel", ControlNetConfig.from_dict)
CONTROLNET = ModelDescription("ControlNet", (
    Component("controlnet", "controlnet", (CONTROLNET_MODEL,), DIFFUSERS_STEMS, subfolder="."),
), support_files=())
