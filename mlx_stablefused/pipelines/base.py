"""BaseDiffusion: what every pipeline shares — a loaded model, a sampler, its own run settings, the
building blocks (prompt -> embedding, image <-> latent) and the driven denoising loop.

Pipelines are flat recipes on top (check inputs, encode the prompt, prepare latents, denoise,
decode) that compose ``inputs``, ``denoise`` and ``vae_io``; none extends another. Written once
for every backend: native arrays are touched only through arithmetic, the sampler and the
``Backend`` methods. Randomness comes from numpy (seeded), so one seed gives the same noise on
MLX and torch, Mac and NVIDIA.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from ..backends import create_backend
from ..backends.base import COMPILE, CPU_STREAMS, QUANTIZE, Array, Backend, RunSettings, as_numpy
from ..conditioning import Conditioning
from ..config import read_json
from ..errors import ModelSourceError, UnsupportedModelError
from ..progress import progress_bar
from ..schedulers import Scheduler, default_scheduler_name, make_scheduler
from ..sources import ModelSource
from ..tokenizer import CLIPTokenizer
from . import inputs
from .denoise import Guidance, StepCallbacks, denoise
from .inputs import PromptType
from ..previews import check_preview_decoder, history_frames
from .controlnet import ControlNetMixin
from .ip_adapter_loader import IPAdapterMixin
from .lora_loader import LoRALoaderMixin
from .prompt_features import PromptFeaturesMixin
from .stablefused_compat import folder_from_components, resolve_dtype, scheduler_choice
from .unet_speedups import UNetSpeedupsMixin, counted_evaluations
from .vae_io import VAEIO
from .vae_tiling import TileSpec


@dataclass(frozen=True)
class ModelComponents:
    """Everything loaded from one model; pipelines built on it share it instead of loading twice."""

    source: ModelSource
    backend: Backend
    tokenizer: CLIPTokenizer
    scheduler_config: dict[str, Any]
    tokenizers: dict[str, CLIPTokenizer] = field(default_factory=dict)  # text-encoder component -> its tokenizer
    model_index: dict[str, Any] = field(default_factory=dict)  # the pipeline's config (SDXL: force_zeros...)

    @classmethod
    def load(cls, model_id: str | Path, *, backend: str = "auto", dtype: str = "float32", device: str | None = None,
             variant: str | None = None, revision: str | None = None, use_cache: bool = True,
             local_files_only: bool = False, motion_adapter: Any = None, vae: str | Path | None = None,
             config: str | Path | None = None, use_ema: bool = False,
             prediction_type: str | None = None) -> "ModelComponents":
        """``model_id`` may be a single-file checkpoint (a path or ``owner/repo/file.safetensors``; see
        ``mlx_stablefused.single_file``: ``config=``, ``use_ema=``); ``vae=`` a VAE file or folder for any
        model; ``prediction_type=`` overrides the scheduler's (``"v_prediction"`` for SD 2.x 768-v files)."""
        from dataclasses import replace

        from ..demo import resolve_special_adapter, resolve_special_id
        from ..model_description import STABLE_DIFFUSION, description_for
        from ..model_index import read_model_index
        from ..motion_adapters import MotionAdapterSource, resolve_motion_adapter
        from ..single_file import resolve_model_or_file, resolve_vae
        from ..sources import is_special_id

        if prediction_type not in (None, "epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
        # Special ids (demo:*) are built here, at the entry layer; the resolver only finds folders and hub ids.
        # The model index names the pipeline class, which picks the components to fetch and load (SD, SDXL).
        model_path = resolve_special_id(model_id)
        description = description_for(read_model_index(model_path, revision=revision,
                                                       local_files_only=local_files_only))
        source = resolve_model_or_file(model_path, variant=variant, revision=revision,
                                       local_files_only=local_files_only, description=description,
                                       config=config, use_ema=use_ema, prediction_type=prediction_type)
        if is_special_id(model_id):
            source = replace(source, origin=model_id)
        if vae is not None:
            source = resolve_vae(vae, source, revision=revision, local_files_only=local_files_only)
        if motion_adapter is not None and not isinstance(motion_adapter, MotionAdapterSource):
            motion_adapter = resolve_motion_adapter(resolve_special_id(motion_adapter),
                                                    local_files_only=local_files_only)
        motion_adapter = resolve_special_adapter(motion_adapter)
        scheduler_file = source.root / "scheduler" / "scheduler_config.json"
        if not scheduler_file.is_file():
            raise ModelSourceError(f"{scheduler_file} is missing")
        index_file = source.root / "model_index.json"
        model_index = read_json(index_file) if index_file.is_file() else {}
        description = description_for(model_index)  # the resolved folder's own index decides (an offline hub id)
        tokenizers = {name: CLIPTokenizer.from_folder(source.root / folder)
                      for name, folder in description.tokenizers.items()}
        options: dict[str, Any] = dict(dtype=dtype, variant=variant, use_cache=use_cache, device=device)
        if motion_adapter is not None:
            options["motion_adapter"] = motion_adapter
        if description is not STABLE_DIFFUSION:
            options["description"] = description
        engine = create_backend(backend, source, **options)
        scheduler_config = read_json(scheduler_file)
        if prediction_type is not None:
            scheduler_config = {**scheduler_config, "prediction_type": prediction_type}
        return cls(source, engine, next(iter(tokenizers.values())), scheduler_config, tokenizers, model_index)


AUTO_ATTENTION_CHUNK = 1024  # query tokens: at 512x512 a quarter of the largest attention, as diffusers' "auto"


def attention_chunk_for(slice_size: int | str | None) -> int | None:
    """``enable_attention_slicing``'s argument -> query tokens per attention slice (None: unsliced).

    diffusers slices over heads ("max": one head at a time); this port slices over query tokens, which
    has no one-head setting, so "max" is refused rather than mapped to a guess."""
    if slice_size is None:
        return None
    if isinstance(slice_size, str):
        if slice_size == "auto":
            return AUTO_ATTENTION_CHUNK
        raise ValueError(f"slice_size={slice_size!r}: pass 'auto', -1 (stablefused's default: the same), None "
                         "(no slicing) or a number of query tokens per slice, e.g. 256 ('max', diffusers' "
                         "one-head-at-a-time slicing, has no equivalent here: this port slices over query tokens)")
    if slice_size == -1 and not isinstance(slice_size, bool):
        return AUTO_ATTENTION_CHUNK
    return inputs.positive_int(slice_size, "slice_size")


def with_run_settings(method: Callable) -> Callable:
    """Run a public entry point with this pipeline's settings in force on the shared backend."""

    @functools.wraps(method)
    def wrapper(self: "BaseDiffusion", *args: Any, **kwargs: Any) -> Any:
        with self.backend.using(self.settings):
            return method(self, *args, **kwargs)

    return wrapper


class BaseDiffusion(LoRALoaderMixin, IPAdapterMixin, PromptFeaturesMixin, ControlNetMixin, UNetSpeedupsMixin):
    """Shared machinery of every pipeline.

    ``model_id``: hub repo id, diffusers folder, converted folder or single-file checkpoint. Or pass ``components`` from
    another pipeline (``other.components``, or ``cls.from_pipeline(other)``) to share its loaded weights.
    stablefused's spellings work too: ``torch_dtype=`` for ``dtype``, a diffusers scheduler object as
    ``scheduler``, and ``tokenizer=, text_encoder=, vae=, unet=, scheduler=`` (diffusers / transformers
    objects) instead of ``model_id``, read into this port's networks (see ``stablefused_compat``).
    ``vae=`` given a path (a VAE file or folder) replaces the VAE of ``model_id``; ``config=``,
    ``use_ema=``, ``prediction_type=`` are for single-file checkpoints (see ``ModelComponents.load``).
    ``controlnet=``: a ControlNet (folder, hub id, single file) or a list of them (``set_controlnet``).
    """

    def __init__(self, model_id: str | Path | None = None, *, components: ModelComponents | None = None,
                 backend: str = "auto", dtype: str = "float32", device: str | None = None,
                 variant: str | None = None, revision: str | None = None, use_cache: bool = True,
                 local_files_only: bool = False, scheduler: Any = None, progress: bool = True,
                 torch_dtype: Any = None, tokenizer: Any = None, text_encoder: Any = None, vae: Any = None,
                 unet: Any = None, config: str | Path | None = None, use_ema: bool = False,
                 prediction_type: str | None = None, distributed: bool = True,
                 guidance_parallel: bool = False, controlnet: Any = None) -> None:
        from ..distributed import bind_local_device

        dtype = resolve_dtype(dtype, torch_dtype)
        bind_local_device()  # under torchrun on CUDA: this rank's GPU, before any weights load
        # vae=: a path (a VAE file or folder replacing the model's, see ModelComponents.load) or, with the
        # other component objects, a diffusers AutoencoderKL (stablefused's component injection)
        vae_file, vae = (vae, None) if isinstance(vae, (str, Path)) else (None, vae)
        if any(c is not None for c in (tokenizer, text_encoder, vae, unet)):
            if model_id is not None or components is not None:
                raise ValueError("pass model_id, components, or the five component objects; not several")
            model_id = folder_from_components(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet,
                                              scheduler=scheduler)
        if (model_id is None) == (components is None):
            raise ValueError("pass exactly one of model_id (to load a model) or components (to share one)")
        model_files = {k: v for k, v in dict(vae=vae_file, config=config, use_ema=use_ema,
                                              prediction_type=prediction_type).items() if v not in (None, False)}
        if components is None:  # see ModelComponents.load: vae=, and config=, use_ema= for single-file checkpoints
            components = ModelComponents.load(model_id, backend=backend, dtype=dtype, device=device,
                                              variant=variant, revision=revision, use_cache=use_cache,
                                              local_files_only=local_files_only, **model_files)
        elif model_files:
            raise ValueError(f"{', '.join(sorted(model_files))}= apply when loading a model_id, not to shared components")
        self.model_id = model_id if model_id is not None else components.source.origin
        self.progress = progress
        # Under mlx.launch / torchrun: split batches across the ranks (False: every rank runs alone), or the
        # guidance halves of each step over two ranks (see pipelines/data_parallel.py).
        self.distributed, self.guidance_parallel = bool(distributed), bool(guidance_parallel)
        self._parallel_call: Any = None
        self.decode_batch_size: int | None = None
        self.tiling: TileSpec | None = None
        self.release_text_encoder = False
        self.release_unet = False  # after each denoising loop (the low-memory preset)
        self._interrupted = False
        self._use_components(components)
        name, overrides = scheduler_choice(scheduler)
        self.scheduler: Scheduler = self.set_scheduler(name or default_scheduler_name(self.scheduler_config),
                                                       **overrides)
        self.set_controlnet(controlnet)  # one or a list (see pipelines/controlnet.py); None: none

    def _use_components(self, components: ModelComponents) -> None:
        self.components = components
        self.source = components.source
        self.backend = components.backend
        self.tokenizer = components.tokenizer
        self.scheduler_config = components.scheduler_config
        self.vae_scale_factor = self.backend.vae_config.downscale_factor
        self.settings = RunSettings(cpu_streams=self.backend.settings.cpu_streams)

    def share_components_with(self, model: "BaseDiffusion") -> None:
        """stablefused's sharing: use ``model``'s loaded networks (no copy) and its sampler choice, as
        ``from_pipeline`` does for a new pipeline; this pipeline's run settings start from the defaults."""
        self._use_components(model.components)
        self.model_id = model.model_id
        self.set_scheduler(model.scheduler_name, **model.scheduler_overrides)

    def to(self, device: str) -> "BaseDiffusion":
        """Run on ``device`` from now on (torch: moves the networks of every pipeline sharing them; MLX:
        'gpu' or 'cpu', MLX's default device). Returns the pipeline, as stablefused's ``to``."""
        self.backend.to_device(device)
        return self

    @property
    def device(self) -> Any:
        return self.backend.device

    @classmethod
    def from_pipeline(cls, other: "BaseDiffusion", **kwargs: Any) -> "BaseDiffusion":
        """A pipeline of this class on ``other``'s loaded model (no weights loaded twice), with a copy of
        its sampler choice and of the run settings it chose; where ``other`` kept a default, this class's
        own default stays (a video pipeline keeps its attention slicing). Later changes affect one only."""
        kwargs.setdefault("progress", other.progress)
        pipe = cls(components=other.components, **kwargs)
        pipe.distributed = kwargs.get("distributed", other.distributed)
        pipe.guidance_parallel = kwargs.get("guidance_parallel", other.guidance_parallel)
        if "scheduler" not in kwargs:
            pipe.set_scheduler(other.scheduler_name, **other.scheduler_overrides)
        defaults = RunSettings(cpu_streams=other.backend.settings.cpu_streams)
        chosen = {f.name: getattr(other.settings, f.name) for f in fields(RunSettings)
                  if getattr(other.settings, f.name) != getattr(defaults, f.name)}
        pipe.settings = replace(pipe.settings, **chosen)
        pipe.copy_prompt_settings(other)
        return pipe

    # ----------------------------------------------------------------------------------- setup
    def set_scheduler(self, name: str, **overrides: Any) -> Scheduler:
        """Switch sampler by stablefused name, configured from the model's scheduler config + ``overrides``."""
        self.scheduler = make_scheduler(name, self.scheduler_config, **overrides)
        self.scheduler_name, self.scheduler_overrides = str(getattr(name, "value", name)).lower(), dict(overrides)
        return self.scheduler

    def load_tiny_autoencoder(self, pretrained_model_name_or_path: str | Path = "madebyollin/taesd", *,
                              subfolder: str | None = None, revision: str | None = None,
                              local_files_only: bool = False) -> None:
        """Load TAESD (a diffusers AutoencoderTiny folder or hub id; "madebyollin/taesdxl" for SDXL latents) beside
        the VAE, for ``PreviewCallback(method="taesd")`` and ``history_decoder="taesd"``. It lives with the loaded
        networks: pipelines sharing them (``from_pipeline``) have it too."""
        from ..tiny_autoencoder import load_tiny_autoencoder

        load_tiny_autoencoder(self.backend, pretrained_model_name_or_path, subfolder=subfolder, revision=revision,
                              local_files_only=local_files_only)

    def enable_low_memory(self, enabled: bool = True, unet_bits: int | None = None,
                          unet_batch_size: int | None = 1) -> None:
        """The low-memory preset (``low_memory.py``): text encoders freed after each encoding and the UNet after
        each denoising loop (MLX: re-read lazily when next needed), attention slicing, the UNet's batch one
        sample per pass (the guidance halves one after the other), one image at a time through the VAE; exact.
        ``unet_bits=8`` also quantizes the UNet (MLX); ``unet_batch_size=None`` keeps the halves side by side.
        ``enabled=False``: the options before it."""
        from .low_memory import enable_low_memory

        enable_low_memory(self, enabled, unet_bits, attention_chunk=AUTO_ATTENTION_CHUNK,
                          unet_batch_size=unet_batch_size)

    def _require(self, capability: str, what: str) -> None:
        if not self.backend.supports(capability):
            raise NotImplementedError(f"the {self.backend.name} backend has no {what}")

    def enable_compile(self, enabled: bool = True) -> None:
        """Compile the UNet step into fused kernels (MLX: ``mx.compile``); pays most on Metal."""
        self._require(COMPILE, "compiled path")
        if enabled and (self.settings.deep_cache or self.settings.token_merging):
            raise ValueError("enable_compile: DeepCache and token merging run the UNet uncompiled; call "
                             "disable_deepcache() / disable_token_merging() first")
        self.settings = replace(self.settings, compile=bool(enabled))

    def set_cpu_streams(self, count: int | None = None) -> int:
        """MLX on a CPU: run the guidance halves and VAE row bands on ``count`` cores at once (None: one
        per core, the default; 1: everything on one stream). Returns the count in use."""
        self._require(CPU_STREAMS, "CPU streams (it schedules its own threads)")
        if count is not None and (not isinstance(count, (int, np.integer)) or isinstance(count, bool) or count < 1):
            raise ValueError(f"the number of CPU streams must be at least 1, got {count!r}")
        self.settings = replace(self.settings, cpu_streams=count)
        with self.backend.using(self.settings):
            return self.backend.cpu_stream_count

    def quantize(self, bits: int = 8, group_size: int = 64, components: Sequence[str] = ("unet",)) -> None:
        """Quantize the Linear layers of the UNet (and optionally the text encoder) to ``bits`` bits.

        This changes the loaded weights, so every pipeline sharing these components sees it."""
        self._require(QUANTIZE, "quantized path")
        unknown = set(components) - {"unet", "text_encoder"}
        if unknown or bits not in (2, 3, 4, 6, 8):
            raise ValueError(f"quantize: bits in (2, 3, 4, 6, 8) and components from ('unet', 'text_encoder'); "
                             f"got bits={bits}, components={list(components)}")
        self.backend.quantize(bits, group_size, tuple(components))

    def enable_slicing(self) -> None:
        """Decode one image at a time (VAE memory stays that of one image)."""
        self.decode_batch_size = 1

    def disable_slicing(self) -> None:
        self.decode_batch_size = None

    def enable_tiling(self, tile_size: int | None = None, overlap: float = 0.25) -> None:
        """Run the VAE on overlapping ``tile_size``-pixel tiles (default: the VAE's sample_size) and blend
        them, as diffusers' VAE tiling does: memory stays that of one tile for any image size."""
        size = int(tile_size or self.backend.vae_config.sample_size)
        if size % self.vae_scale_factor or not 0.0 <= overlap < 1.0:
            raise ValueError(f"tile_size must be a multiple of {self.vae_scale_factor} and overlap in [0, 1)")
        self.tiling = TileSpec(size, size // self.vae_scale_factor, overlap)

    def disable_tiling(self) -> None:
        self.tiling = None

    def enable_attention_slicing(self, slice_size: int | str | None = "auto") -> None:
        """Attend in chunks of ``slice_size`` query tokens to cap attention memory (None: disable).
        ``"auto"`` and -1 (stablefused's default argument, its way of asking for diffusers' "auto") mean
        1024 tokens; ``"max"`` is refused (see ``attention_chunk_for``). A setting of this pipeline: others
        sharing its components keep theirs."""
        self.settings = replace(self.settings, attention_chunk=attention_chunk_for(slice_size))

    def disable_attention_slicing(self) -> None:
        self.enable_attention_slicing(None)

    @property
    def latent_channels(self) -> int:
        return self.backend.vae_config.latent_channels

    @property
    def vae_io(self) -> VAEIO:
        return VAEIO(self.backend, self.tiling, self.decode_batch_size, self.progress)

    # ------------------------------------------------------------------------------ interrupt
    def interrupt(self) -> None:
        """Stop the generation in progress after its current step (from a step callback or another
        thread); the call returns what the latents are at that point. Cleared when the next call starts."""
        self._interrupted = True

    @property
    def interrupted(self) -> bool:
        """Whether the last generation was stopped by ``interrupt()``."""
        return self._interrupted

    # ------------------------------------------------------------------------------- validation
    def validate_size(self, height: int, width: int) -> None:
        inputs.check_size(height, width, self.vae_scale_factor)

    def check_memory(self, height: int, width: int, batch: int, frames: int = 1,
                     names: tuple[str, str] = ("image_height", "image_width")) -> None:
        """Refuse, before any work, a request that cannot fit (memory_estimate: a lower bound of its peak,
        with this pipeline's tiling, slicing and decode batching), and any over the pixel cap."""
        from ..memory_estimate import Request, check_fits, check_pixel_cap

        check_pixel_cap(height, width, names)
        request = Request(height, width, batch, frames, attention_chunk=self.settings.attention_chunk,
                          tile=self.tiling.sample_size if self.tiling else None, decode_batch=self.decode_batch_size)
        backend = self.backend
        what = f"{names[0]}={height}, {names[1]}={width}" + (f", {frames} frames" if frames > 1 else "")
        check_fits(backend.unet_config, backend.vae_config, request, backend.dtype_bytes, backend.fused_attention,
                   backend.available_memory(), what + (f", batch {batch}" if batch > 1 else ""),
                   backend.attention_slice_bytes)

    @staticmethod
    def validate_steps(num_inference_steps: int) -> None:
        inputs.positive_int(num_inference_steps, "num_inference_steps")

    @staticmethod
    def validate_input(prompt: PromptType | None = None, negative_prompt: PromptType | None = None,
                       image_height: int | None = None, image_width: int | None = None,
                       start_step: int | None = None, num_inference_steps: int | None = None,
                       strength: float | None = None) -> None:
        """stablefused's checks, by this port's rules: prompts (and one negative per prompt), sizes in
        multiples of 8, ``start_step`` in [0, num_inference_steps), ``strength`` in [0, 1]."""
        if prompt is not None:
            inputs.prompt_pairs(prompt, negative_prompt)
        if image_height is not None and image_width is not None:
            inputs.check_size(image_height, image_width, 8)
        if start_step is not None:
            if num_inference_steps is None:
                raise ValueError("num_inference_steps must be given with start_step")
            inputs.start_index(inputs.positive_int(num_inference_steps, "num_inference_steps"), start_step, None, 1)
        if strength is not None:
            inputs.fraction(strength, "strength")

    def _check_output_type(self, output_type: str) -> None:
        inputs.check_output_type(output_type, self.backend.native_output_type)

    # ---------------------------------------------------------------------------------- prompts
    @with_run_settings
    def prompt_to_embedding(self, prompt: PromptType, negative_prompt: PromptType | None = None,
                            prompt_2: PromptType | None = None, negative_prompt_2: PromptType | None = None) -> Any:
        """Text embeddings ``[uncond; cond]``, shape (2B, 77, D); ``negative_prompt`` defaults to "".
        With ``enable_prompt_weighting()``: (2B, 77 k, D), k the largest chunk count of them all.

        SDXL models return ``(embeddings, pooled)``: the two encoders' penultimate states concatenated,
        (2B, 77, D1 + D2) (2048 for SDXL base; the refiner's single encoder: 1280), and the second
        encoder's projected pooled output, (2B, P) (1280); ``prompt_2`` / ``negative_prompt_2`` go to the
        second encoder (default: the first's). With no ``negative_prompt`` and the model's
        ``force_zeros_for_empty_prompt`` the unconditional rows are zeros, as diffusers."""
        from .sdxl_conditioning import is_sdxl, sdxl_prompts

        prompts, negatives = inputs.prompt_pairs(prompt, negative_prompt)
        if is_sdxl(self.backend):
            encoder = self.sdxl_prompt_encoder()
            prompts = self.take_lora_tags(prompts)
            (text, pooled), (neg_text, neg_pooled) = encoder.encode_pairs(
                prompts, negatives, sdxl_prompts(negative_prompt, prompt_2, negative_prompt_2))
            embedding = (self.backend.concat([neg_text, text]), self.backend.concat([neg_pooled, pooled]))
        else:
            if prompt_2 is not None or negative_prompt_2 is not None:
                raise ValueError("prompt_2 and negative_prompt_2: only SDXL models take these")
            embedding = self.encode_texts(negatives + prompts, positives=len(prompts))
        if self.release_text_encoder:
            self.backend.release_text_encoder()
        return embedding

    def encode_prompt(self, prompts: list[str], negatives: list[str], sdxl: Any = None,
                      num_images_per_prompt: int = 1) -> tuple[Conditioning, Conditioning]:
        """(positive, negative) conditioning for prompt pairs, encoded in one text-encoder pass; ``sdxl``
        (``sdxl_conditioning.SDXLInputs``) adds the second prompts, pooled embeddings and time ids."""
        if sdxl is None:
            return self.split_embedding(self.prompt_to_embedding(prompts, negatives))
        out = self.sdxl_prompt_encoder().conditioning(self.take_lora_tags(prompts), negatives, sdxl,
                                                      num_images_per_prompt)
        if self.release_text_encoder:
            self.backend.release_text_encoder()
        return out

    def split_embedding(self, embedding: Array, sdxl: Any = None) -> tuple[Conditioning, Conditioning]:
        """``[uncond; cond]`` -> (positive, negative) conditioning. SDXL's ``(states, pooled)`` take the time
        ids of ``sdxl`` (``sdxl_conditioning.SDXLInputs``), one row per image."""
        if isinstance(embedding, tuple):
            if sdxl is None:
                raise UnsupportedModelError("SDXL embeddings (states, pooled) need their time ids: this call does "
                                            "not take SDXL models (latent walks and interpolation do)")
            (text, pooled), b = embedding, embedding[0].shape[0] // 2
            ids = [self.backend.from_numpy(np.tile(np.asarray(row, np.float32), (b, 1))) for row in sdxl.time_ids]
            return Conditioning(text[b:], pooled[b:], ids[0]), Conditioning(text[:b], pooled[:b], ids[1])
        b = embedding.shape[0] // 2
        return Conditioning(text=embedding[b:]), Conditioning(text=embedding[:b])

    def classifier_free_guidance(self, noise_prediction: Array, guidance_scale: float,
                                 guidance_rescale: float) -> Array:
        """``uncond + s * (cond - uncond)``, optionally rescaled toward cond's std (arXiv 2305.08891);
        ``noise_prediction`` is the UNet's ``[uncond; cond]`` batch."""
        return Guidance(guidance_scale, guidance_rescale).combine(self.backend, noise_prediction)

    def random_tensor(self, shape: Sequence[int], seed: int | np.random.Generator | None = None) -> Array:
        """Standard-normal noise of ``shape`` (taken as given: (B, 4, h, w) latents, (B, 3, H, W) images) as a
        native float32 array; drawn from numpy, so ``seed`` gives the same values on every backend."""
        shape = tuple(inputs.positive_int(n, "shape") for n in shape)
        return self.backend.from_numpy(inputs.random_latent(shape, inputs.make_rng(seed)))

    # ------------------------------------------------------------------------------ the loop
    def run_denoise(self, latents: Array, positive: Conditioning, negative: Conditioning | None, guidance: Guidance,
                    rng: np.random.Generator, start: int = 0, *, callback_on_step_end: Any = None,
                    return_latent_history: bool = False, progress_desc: str = "denoising",
                    **core: Any) -> list[Array]:
        """Drive ``denoise`` to the end (or an ``interrupt()``): progress bar, step callbacks, history.

        Returns ``[final]``, or every latent from the start when ``return_latent_history``."""
        self.check_image_tokens(positive)  # a loaded IP-Adapter and a call without the image prompt: refused
        if self.controlnets and core.get("step_conditioning") is None:  # nor a ControlNet left out silently
            raise ValueError(f"{len(self.controlnets)} ControlNet(s) are set and this call takes no control_image "
                             "(embedding_to_latent, sample_from_noise); set_controlnet(None) first")
        callbacks = StepCallbacks(self, callback_on_step_end)
        if self._parallel_call is not None:  # guidance parallel: the UNet call shared with the other rank
            core["predict"] = self._parallel_call.predictor(core.get("predict"), guidance.enabled)
        history = [latents]
        steps = (core.get("stop") or len(self.scheduler.timesteps)) - start
        core["predict"] = counted_evaluations(self.backend, self.settings, core.get("predict"), steps)
        with progress_bar(steps, progress_desc, self.progress, unit="step") as bar:
            for state in denoise(self.backend, self.scheduler, latents, positive, negative, guidance, rng, start,
                                 **core):
                callbacks(state)
                latents = state.latents
                if return_latent_history:
                    history.append(latents)
                bar.update(1)
                if self._interrupted:
                    break
        if self.release_unet:
            self.backend.evaluate(*history)  # the latents exist before the UNet's weights go
            self.backend.release_unet()
        return history if return_latent_history else [latents]

    def _begin(self) -> None:
        """Start of a public generation call."""
        self._interrupted = False
        self._parallel_call = None

    @with_run_settings
    def sample_from_noise(self, embedding: Array, noise: np.ndarray, num_inference_steps: int, guidance_scale: float,
                          guidance_rescale: float, rng: np.random.Generator,
                          return_latent_history: bool = False, callback_on_step_end: Any = None,
                          sdxl: Any = None, **core: Any) -> list[Array]:
        """The full schedule from initial noise (B, C, h, w) numpy, scaled by the sampler's initial sigma;
        ``embedding`` is ``[uncond; cond]`` as ``prompt_to_embedding`` returns it (SDXL: with ``sdxl``'s time
        ids). ``core``: ``denoise``'s keywords (``step_noise``)."""
        self.scheduler.set_timesteps(num_inference_steps)
        x = self.backend.latent_from_numpy(noise * np.float32(self.scheduler.init_noise_sigma))
        positive, negative = self.split_embedding(embedding, sdxl)
        return self.run_denoise(x, positive, negative, Guidance(guidance_scale, guidance_rescale), rng,
                                callback_on_step_end=callback_on_step_end,
                                return_latent_history=return_latent_history, **core)

    # ------------------------------------------------------------------------------------- VAE
    @with_run_settings
    def latent_to_image(self, latent: Array | np.ndarray, output_type: str = "pil",
                        decode_batch_size: int | None = None) -> Any:
        """Decode scaled latents in diffusers' layout, (B, C, h, w) (numpy or a native array, as
        ``image_to_latent`` and step callbacks give them), to images of ``output_type``."""
        self._check_output_type(output_type)
        return self.vae_io.output(self.backend.latent_from_public(latent), output_type, decode_batch_size)

    def image_to_latent(self, image: Image.Image | Sequence[Image.Image] | np.ndarray | str | Path,
                        size: tuple[int, int] | None = None) -> Array:
        """Scaled latent of ``image``: mapped to [-1, 1], posterior mean times the VAE scaling factor; a
        native array in diffusers' layout (B, C, h, w) on every backend, so it can be fed back as ``latent=``."""
        return self.backend.latent_to_public(self.pixels_to_latent(self.preprocess_image(image, size)))

    @with_run_settings
    def pixels_to_latent(self, pixels: np.ndarray) -> Array:
        """(B, H, W, 3) float pixels in [0, 1] -> scaled posterior-mean latents (native)."""
        return self.vae_io.encode(pixels)

    def preprocess_image(self, image: Any, size: tuple[int, int] | None = None) -> np.ndarray:
        """An image or batch -> (B, H, W, 3) float32 in [0, 1].

        Accepts a path, a PIL image, a list of either, or a (B,)H,W,3 numpy array (uint8, or float in
        [0, 1]). ``size=(height, width)`` resizes (Lanczos); without it the size must be a multiple of 8.
        """
        return inputs.load_image(image, self.vae_scale_factor, size)

    @with_run_settings
    def resolve_output(self, latents: list[Array] | None = None, output_type: str = "pil",
                       return_latent_history: bool = False, *, latent: Any = None,
                       history_decoder: str = "vae") -> Any:
        """Final latent -> images; with history, every step's latent per prompt: (B, steps+1, ...).

        ``latents``: the list ``embedding_to_latent`` returns (native). ``latent`` (stablefused's keyword):
        that list, or a latent in diffusers' layout, or with history stablefused's stack (steps+1, B, C, h, w).
        ``history_decoder``: "vae" (exact), or "taesd" / "linear" for cheap history frames (see ``previews``);
        the final image of a call without history always comes from the VAE.
        """
        if (latents is None) == (latent is None):
            raise ValueError("pass latents (a list of native latents) or latent, not both or neither")
        if latent is not None:
            latents = latent if isinstance(latent, (list, tuple)) else self._public_latents(latent, return_latent_history)
        self._check_output_type(output_type)
        check_preview_decoder(self, history_decoder)
        if return_latent_history and history_decoder != "vae" and output_type != "latent":
            return self.vae_io.format(history_frames(self, latents, history_decoder), output_type)
        if return_latent_history:
            return self.vae_io.history_output(latents, output_type)
        return self.vae_io.output(latents[-1], output_type)

    def _public_latents(self, latent: Any, history: bool) -> list[Array]:
        if not history:
            return [self.backend.latent_from_public(latent)]
        stack = as_numpy(latent)
        if stack.ndim != 5:
            raise ValueError(f"a latent history is (steps+1, B, C, h, w), got shape {stack.shape}")
        return [self.backend.latent_from_numpy(step) for step in stack]
