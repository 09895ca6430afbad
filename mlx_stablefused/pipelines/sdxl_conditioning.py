"""SDXL's conditioning: two-encoder prompt encoding, pooled embeddings and micro-conditioning time ids.

What diffusers' StableDiffusionXL pipelines do before their denoising loop, as one object the
shared pipelines call when the model is an SDXL one (a ``text_time`` UNet):

* the prompt goes through every text encoder (``prompt_2`` to the second, defaulting to ``prompt``);
  the penultimate hidden states are concatenated on the feature axis, and the last encoder's
  projected pooled output is the pooled embedding;
* with ``force_zeros_for_empty_prompt`` (model_index.json; diffusers' default True) and no
  ``negative_prompt``, the unconditional branch is all zeros, not the encoding of "";
* the time ids: ``original_size + crops_coords_top_left + target_size`` (6 numbers), or for a refiner
  (``requires_aesthetics_score``) ``original_size + crops_coords_top_left + (aesthetic_score,)`` (5).
  Every negative value defaults to its positive one (``MicroConditioning``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from ..conditioning import Conditioning
from ..errors import UnsupportedModelError
from ..validation import finite_float, non_negative_int, positive_int
from . import inputs
from .inputs import PromptType

Array = Any
Pair = tuple[int, int]

# The pipelines' keywords that only SDXL models take (diffusers' names).
SDXL_PROMPT_KEYWORDS = ("prompt_2", "negative_prompt_2")


def is_sdxl(backend: Any) -> bool:
    """Whether the loaded UNet takes SDXL's added conditioning (pooled text and time ids)."""
    return getattr(backend.unet_config, "addition_embed_type", None) == "text_time"


def _pair(value: Any, name: str, check: Any) -> Pair | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name} must be a pair of integers (height, width) or (top, left), got {value!r}")
    return check(value[0], name), check(value[1], name)


@dataclass(frozen=True)
class MicroConditioning:
    """SDXL's size and crop conditioning (arXiv 2307.01952 section 2.2), diffusers' keyword names.

    Sizes are (height, width) in pixels, crops (top, left); ``None`` sizes default to the image size and
    ``None`` negative values to the positive ones, in every pipeline. diffusers 0.42 has three rules instead
    (text-to-image ignores the negative sizes unless both are given, then crops at (0, 0); image-to-image
    and inpainting ignore ``negative_crops_coords_top_left`` unless the model is a refiner, diffusers PR
    #14676; refiners crop the negative branch at (0, 0)); where a caller gives every negative value, or none,
    the ids are the same. ``aesthetic_score`` / ``negative_aesthetic_score`` are used by refiners
    (``requires_aesthetics_score``)."""

    original_size: Pair | None = None
    crops_coords_top_left: Pair = (0, 0)
    target_size: Pair | None = None
    negative_original_size: Pair | None = None
    negative_crops_coords_top_left: Pair | None = None
    negative_target_size: Pair | None = None
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5

    def __post_init__(self) -> None:
        """Refuse wrong shapes and types before any work, naming the keyword."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("aesthetic_score"):
                checked = finite_float(value, f.name)
            elif f.name.endswith("crops_coords_top_left"):
                checked = _pair(value, f.name, non_negative_int)
                if checked is None and f.name == "crops_coords_top_left":
                    raise ValueError(f"{f.name} must be a pair of integers (top, left), got None")
            else:
                checked = _pair(value, f.name, positive_int)
            object.__setattr__(self, f.name, checked)

    def time_ids(self, height: int, width: int, aesthetic: bool) -> tuple[list[float], list[float]]:
        """(positive, negative) time ids for an image of ``height`` x ``width``: sizes default to the image
        size, and every ``negative_*`` value to its positive one. ``aesthetic`` (refiners): the aesthetic
        score takes the target size's place."""
        original = self.original_size or (height, width)
        target = self.target_size or (height, width)
        crop = self.crops_coords_top_left
        neg_original = self.negative_original_size or original
        neg_crop = crop if self.negative_crops_coords_top_left is None else self.negative_crops_coords_top_left
        if aesthetic:
            return [*original, *crop, self.aesthetic_score], [*neg_original, *neg_crop, self.negative_aesthetic_score]
        return [*original, *crop, *target], [*neg_original, *neg_crop, *(self.negative_target_size or target)]


MICRO_KEYWORDS = tuple(f.name for f in fields(MicroConditioning))


@dataclass(frozen=True)
class SDXLInputs:
    """Everything an SDXL call adds to a pipeline's inputs, checked: the second prompts, whether the
    caller passed ``negative_prompt`` at all (``force_zeros_for_empty_prompt`` applies only when not), and
    the (positive, negative) time ids, already checked against the UNet's add_embedding."""

    prompt_2: PromptType | None
    negative_prompt_2: PromptType | None
    negative_given: bool
    time_ids: tuple[list[float], list[float]]


def sdxl_prompts(negative_prompt: PromptType | None, prompt_2: PromptType | None = None,
                 negative_prompt_2: PromptType | None = None) -> SDXLInputs:
    """The prompt part of ``SDXLInputs`` alone (no time ids: for ``prompt_to_embedding``)."""
    for name, value in (("prompt_2", prompt_2), ("negative_prompt_2", negative_prompt_2)):
        if value is not None:
            inputs.as_prompt_list(value, name)
    return SDXLInputs(prompt_2, negative_prompt_2, negative_prompt is not None, ([], []))


def sdxl_inputs(pipe: Any, negative_prompt: PromptType | None, height: int, width: int, *, text_to_image: bool,
                prompt_2: PromptType | None = None, negative_prompt_2: PromptType | None = None,
                **micro: Any) -> SDXLInputs | None:
    """The checked SDXL inputs of a call for an image of ``height`` x ``width``, or None for a non-SDXL
    model (which refuses SDXL keywords by name). ``text_to_image``: a refiner is refused (it needs an image)."""
    if not is_sdxl(pipe.backend):
        given = [k for k, v in {"prompt_2": prompt_2, "negative_prompt_2": negative_prompt_2, **micro}.items()
                 if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: only SDXL models take these (this model's UNet has no "
                             "text_time conditioning)")
        return None
    prompts = sdxl_prompts(negative_prompt, prompt_2, negative_prompt_2)
    encoder = SDXLPromptEncoder(pipe.components)
    conditioning = MicroConditioning(**{k: v for k, v in micro.items() if v is not None})
    if text_to_image and encoder.requires_aesthetics_score:
        raise UnsupportedModelError("this SDXL model is a refiner (requires_aesthetics_score in its "
                                    "model_index.json): it refines an image; use ImageToImageDiffusion")
    ids = conditioning.time_ids(height, width, encoder.requires_aesthetics_score)
    encoder.check_time_ids(len(ids[0]))
    return replace(prompts, time_ids=ids)


class SDXLPromptEncoder:
    """Two-encoder prompt encoding on a loaded SDXL model (the text encoders in description order)."""

    def __init__(self, components: Any, prompt_syntax: str = "plain", comma_padding_backtrack: int = 20) -> None:
        self.prompt_syntax, self.comma_padding_backtrack = prompt_syntax, comma_padding_backtrack
        self.backend = components.backend
        self.tokenizers = components.tokenizers
        self.model_index = components.model_index
        self.encoders = [c.name for c in self.backend.description.components if c.role == "text_encoder"]

    @property
    def force_zeros_for_empty_prompt(self) -> bool:
        return bool(self.model_index.get("force_zeros_for_empty_prompt", True))  # diffusers' default

    @property
    def requires_aesthetics_score(self) -> bool:
        return bool(self.model_index.get("requires_aesthetics_score", False))

    @property
    def pooled_dim(self) -> int:
        last = self.encoders[-1]
        config = self.backend.configs[last]
        with_projection = hasattr(self.backend.components[last], "text_projection")
        return config.projection_dim if with_projection else config.hidden_size

    def check_time_ids(self, count: int) -> None:
        """Refuse, before any work, time ids the UNet's add_embedding cannot take (a refiner asked for sizes)."""
        unet = self.backend.unet_config
        expected = unet.projection_class_embeddings_input_dim
        made = self.pooled_dim + count * unet.addition_time_embed_dim
        if made != expected:
            hint = ("its model_index.json sets requires_aesthetics_score (5 ids)" if self.requires_aesthetics_score
                    else "a refiner's model_index.json sets requires_aesthetics_score (5 ids)")
            raise UnsupportedModelError(
                f"the UNet's add_embedding takes {expected} features, but the pooled text embedding "
                f"({self.pooled_dim}) and {count} time ids x {unet.addition_time_embed_dim} make {made}; {hint}")

    def encode(self, prompts: list[str], prompts_2: list[str]) -> tuple[Array, Array]:
        """(B, 77, sum of encoder widths) penultimate states concatenated, and (B, P) pooled embeddings."""
        if self.prompt_syntax == "a1111":
            return self.encode_weighted(prompts, prompts_2)
        states, pooled = [], None
        for name, texts in zip(self.encoders, [prompts, prompts_2][-len(self.encoders):]):
            hidden, pooled = self.backend.encode_text_states(self.tokenizers[name](texts), name)
            states.append(hidden)
        return (states[0] if len(states) == 1 else concat_features(self.backend, states)), pooled

    def encode_weighted(self, prompts: list[str], prompts_2: list[str]) -> tuple[Array, Array]:
        """AUTOMATIC1111's syntax on both encoders, as its SDXL conditioner runs it: each encoder chunks,
        weights and mean-restores its own penultimate states (both padded to one chunk count, so they
        concatenate), and the pooled embedding is the last encoder's for each prompt's first chunk."""
        from .. import prompt_weighting as pw

        lines = {name: [pw.tokenize_line(self.tokenizers[name], t, self.comma_padding_backtrack) for t in texts]
                 for name, texts in zip(self.encoders, [prompts, prompts_2][-len(self.encoders):])}
        count = max(len(c.ids) for chunks in lines.values() for c in chunks)
        states, pooled = [], None
        for name, chunks in lines.items():
            chunked = [c.padded(count, pw.empty_chunk(self.tokenizers[name])) for c in chunks]
            hidden, pooled = self.backend.encode_text_states(np.concatenate([c.ids for c in chunked]), name)
            states.append(pw.weighted_states(self.backend, chunked, hidden))
        pooled = pooled[::count] if count > 1 else pooled
        return (states[0] if len(states) == 1 else concat_features(self.backend, states)), pooled

    def encode_pairs(self, prompts: list[str], negatives: list[str], sdxl: SDXLInputs,
                     k: int = 1) -> tuple[tuple[Array, Array], tuple[Array, Array]]:
        """((text, pooled) of the prompts, that of the negatives: zeros under force_zeros_for_empty_prompt),
        for prompt lists already repeated ``k`` times per prompt; one encoder pass over both branches."""
        prompts_2, negatives_2 = inputs.expand_prompts(sdxl.prompt_2 or prompts[::k],
                                                       sdxl.negative_prompt_2 or negatives[::k], k)
        if len(prompts_2) != len(prompts):
            raise ValueError(f"prompt_2 has {len(prompts_2) // k} entries for {len(prompts) // k} prompt(s)")
        if not sdxl.negative_given and self.force_zeros_for_empty_prompt:
            text, pooled = self.encode(prompts, prompts_2)
            return (text, pooled), (text * 0.0, pooled * 0.0)
        text, pooled = self.encode(negatives + prompts, negatives_2 + prompts_2)
        b = len(negatives)
        return (text[b:], pooled[b:]), (text[:b], pooled[:b])

    def conditioning(self, prompts: list[str], negatives: list[str], sdxl: SDXLInputs,
                     k: int = 1) -> tuple[Conditioning, Conditioning]:
        """(positive, negative) ``Conditioning``s with text, pooled text and time ids (one row per image)."""
        (text, pooled), (neg_text, neg_pooled) = self.encode_pairs(prompts, negatives, sdxl, k)
        ids = [self.backend.from_numpy(np.tile(np.asarray(row, np.float32), (len(prompts), 1)))
               for row in sdxl.time_ids]
        return Conditioning(text, pooled, ids[0]), Conditioning(neg_text, neg_pooled, ids[1])


def concat_features(backend: Any, arrays: list[Array]) -> Array:
    """Concatenate (B, L, D_i) arrays on the feature axis with the backend's batch concat (MLX and torch
    arrays both have ``swapaxes``)."""
    return backend.concat([a.swapaxes(0, -1) for a in arrays]).swapaxes(0, -1)


def check_sdxl_keywords(keywords: dict[str, Any], aesthetic: bool = False) -> dict[str, Any]:
    """The extra keywords of a pipeline call, refused by name unless they are SDXL's (as Python refuses an
    unknown keyword); ``aesthetic``: the image pipelines also take the aesthetic scores."""
    allowed = SDXL_PROMPT_KEYWORDS + tuple(k for k in MICRO_KEYWORDS if aesthetic or "aesthetic" not in k)
    unknown = [k for k in keywords if k not in allowed]
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
                        f"SDXL models take {', '.join(allowed)}")
    return keywords


def default_image_side(backend: Any, vae_scale_factor: int) -> int:
    """The default image side: SDXL's from the UNet (sample_size x the VAE factor: 1024 for SDXL base,
    512 for SDXL-Turbo), else 512 (stablefused's default for SD 1.x / 2.x)."""
    sample = getattr(backend.unet_config, "sample_size", None)
    return int(sample) * vae_scale_factor if is_sdxl(backend) and sample else 512


def check_denoising_fraction(value: Any, name: str) -> float | None:
    """``denoising_end`` / ``denoising_start``: None, or a number strictly between 0 and 1."""
    if value is None:
        return None
    v = finite_float(value, name)
    if not 0.0 < v < 1.0:
        raise ValueError(f"{name} must be a fraction strictly between 0 and 1, got {value!r}")
    return v


def check_denoising_range(denoising_start: Any, denoising_end: Any, start_step: Any,
                          strength: Any) -> tuple[float | None, float | None]:
    """Both fractions checked, and together: start below end, and ``denoising_start`` instead of
    ``start_step``/``strength`` (it sets where the schedule begins)."""
    start = check_denoising_fraction(denoising_start, "denoising_start")
    end = check_denoising_fraction(denoising_end, "denoising_end")
    if start is not None and (start_step is not None or strength is not None):
        raise ValueError("pass denoising_start or start_step/strength, not both")
    if start is not None and end is not None and start >= end:
        raise ValueError(f"denoising_start={start} must be below denoising_end={end}")
    return start, end


def _cutoff(scheduler: Any, fraction: float) -> int:
    """diffusers' discrete timestep cutoff of a denoising fraction."""
    train = int(scheduler.config.get("num_train_timesteps", 1000))
    return int(round(train - fraction * train))


def denoising_end_index(scheduler: Any, denoising_end: float | None) -> int | None:
    """The table index where ``denoising_end`` stops the schedule (timesteps already set): the entries at
    or above diffusers' cutoff run. None: the whole schedule."""
    if denoising_end is None:
        return None
    cutoff = _cutoff(scheduler, denoising_end)
    return int(sum(float(t) >= cutoff for t in scheduler.timesteps))


def denoising_start_index(scheduler: Any, denoising_start: float) -> int:
    """The table index where ``denoising_start`` begins (timesteps already set): the entries below the
    cutoff run; a second-order sampler starts on the first of an entry pair, as diffusers."""
    cutoff = _cutoff(scheduler, denoising_start)
    count = int(sum(float(t) < cutoff for t in scheduler.timesteps))
    if getattr(scheduler, "order", 1) == 2 and count % 2 == 0:
        count += 1
    return len(scheduler.timesteps) - count


def given_latents(image: Any, latent_channels: int) -> np.ndarray | None:
    """``image`` as scaled latents (B, C, h, w) when it is one (a numpy array with the latent channel count on
    axis 1, as another pipeline's ``output_type="latent"`` returns; diffusers takes them as ``image`` too);
    None for images. Checked finite."""
    if not isinstance(image, np.ndarray) or image.ndim != 4 or image.shape[1] != latent_channels \
            or image.shape[-1] in (1, 3):
        return None
    latents = np.asarray(image, dtype=np.float32)
    if not np.isfinite(latents).all():
        raise ValueError("the image latent contains NaN or infinite values")
    return latents
