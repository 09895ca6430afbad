"""BaseDiffusion: model loading, prompts, guidance, the denoising loop, VAE encode/decode, outputs.

Written once for every backend: it holds backend-native arrays and touches them only
through arithmetic, the sampler, and the ``Backend`` methods. Randomness comes from
numpy (seeded), so one seed gives the same noise on MLX and torch, Mac and NVIDIA.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..backends import create_backend
from ..backends.base import Array, Backend
from ..config import read_json
from ..errors import ModelSourceError
from ..schedulers import Scheduler, default_scheduler_name, make_scheduler
from ..sources import ModelSource, resolve_model
from ..tokenizer import CLIPTokenizer
from ..utils.images import denormalize, normalize, numpy_to_pil
from .vae_tiling import TileSpec, tiled_decode, tiled_encode

PromptType = str | Sequence[str]
OUTPUT_TYPES = ("pil", "np", "latent")


def as_prompt_list(prompt: PromptType, name: str = "prompt") -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise TypeError(f"{name} must be a string or a non-empty list of strings, got {prompt!r:.80}")


@dataclass(frozen=True)
class ModelComponents:
    """Everything loaded from one model; pipelines built on it share it instead of loading twice."""

    source: ModelSource
    backend: Backend
    tokenizer: CLIPTokenizer
    scheduler_config: dict[str, Any]

    @classmethod
    def load(cls, model_id: str | Path, *, backend: str = "mlx", dtype: str = "float32", device: str | None = None,
             variant: str | None = None, revision: str | None = None, use_cache: bool = True,
             local_files_only: bool = False, motion_adapter: Any = None) -> "ModelComponents":
        from dataclasses import replace

        from ..demo import resolve_special_adapter, resolve_special_id
        from ..model_description import STABLE_DIFFUSION
        from ..motion_adapters import MotionAdapterSource, resolve_motion_adapter
        from ..sources import is_special_id

        # Special ids (demo:*) are built here, at the entry layer; the resolver only finds folders and hub ids.
        source = resolve_model(resolve_special_id(model_id), variant=variant, revision=revision,
                               local_files_only=local_files_only, description=STABLE_DIFFUSION)
        if is_special_id(model_id):
            source = replace(source, origin=model_id)
        if motion_adapter is not None and not isinstance(motion_adapter, MotionAdapterSource):
            motion_adapter = resolve_motion_adapter(resolve_special_id(motion_adapter),
                                                    local_files_only=local_files_only)
        motion_adapter = resolve_special_adapter(motion_adapter)
        scheduler_file = source.root / "scheduler" / "scheduler_config.json"
        if not scheduler_file.is_file():
            raise ModelSourceError(f"{scheduler_file} is missing")
        text_encoder = STABLE_DIFFUSION.first_with_role("text_encoder")
        tokenizer = CLIPTokenizer.from_folder(source.root / STABLE_DIFFUSION.tokenizers[text_encoder.name])
        options: dict[str, Any] = dict(dtype=dtype, variant=variant, use_cache=use_cache, device=device)
        if motion_adapter is not None:
            options["motion_adapter"] = motion_adapter
        engine = create_backend(backend, source, **options)
        return cls(source, engine, tokenizer, read_json(scheduler_file))


def _open_image(path: str | Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise ValueError(f"could not read image file {path}: {e}") from e


def load_pixels(image: Any, size: tuple[int, int] | None = None, mode: str = "RGB") -> np.ndarray:
    """Path / PIL / list / numpy -> (B, H, W, C) float32 in [0, 1]; C is 3 for RGB, 1 for "L"."""
    channels = 3 if mode == "RGB" else 1
    items = image if isinstance(image, (list, tuple)) else [image]
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 2 and channels == 1:
            arr = arr[None, ..., None]
        elif arr.ndim == 3 and (arr.shape[-1] == channels or channels == 1 and arr.shape[-1] != 3):
            arr = arr[None] if arr.shape[-1] == channels else arr[..., None]
        if arr.ndim != 4 or arr.shape[-1] != channels:
            raise ValueError(f"{'image' if channels == 3 else 'mask'} arrays must be (B, H, W, {channels}) "
                             f"or (H, W{', 3' if channels == 3 else ''}), got {image.shape}")
        if arr.dtype == np.uint8:
            arr = arr.astype(np.float32) / 255.0
        else:
            arr = arr.astype(np.float32)
            if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
                raise ValueError("float image arrays must be in [0, 1]")
        if size is not None and arr.shape[1:3] != tuple(size):
            pil = numpy_to_pil(arr if channels == 3 else arr)
            return load_pixels(pil, size, mode)
        return arr
    if not items:
        raise ValueError("no images given")
    pils = []
    for item in items:
        if isinstance(item, (str, Path)):
            item = _open_image(item)
        if not isinstance(item, Image.Image):
            raise TypeError(f"images must be paths, PIL images or numpy arrays, got {type(item).__name__}")
        item = item.convert(mode)
        if size is not None and item.size != (size[1], size[0]):
            item = item.resize((size[1], size[0]), Image.LANCZOS)  # PIL sizes are (width, height)
        pils.append(item)
    arrays = [np.asarray(p, dtype=np.float32).reshape(p.size[1], p.size[0], channels) / 255.0 for p in pils]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"images have different sizes: {sorted(shapes)}; pass image_height/image_width")
    return np.stack(arrays)


class BaseDiffusion:
    """Shared machinery of every pipeline.

    ``model_id``: hub repo id, diffusers folder, or converted folder. Or pass ``components`` from
    another pipeline (``other.components``, or ``cls.from_pipeline(other)``) to share its loaded weights.
    """

    def __init__(self, model_id: str | Path | None = None, *, components: ModelComponents | None = None,
                 backend: str = "mlx", dtype: str = "float32", device: str | None = None,
                 variant: str | None = None, revision: str | None = None, use_cache: bool = True,
                 local_files_only: bool = False, scheduler: str | None = None, progress: bool = True) -> None:
        if (model_id is None) == (components is None):
            raise ValueError("pass exactly one of model_id (to load a model) or components (to share one)")
        if components is None:
            components = ModelComponents.load(model_id, backend=backend, dtype=dtype, device=device,
                                              variant=variant, revision=revision, use_cache=use_cache,
                                              local_files_only=local_files_only)
        self.components = components
        self.model_id = model_id if model_id is not None else components.source.origin
        self.source = components.source
        self.backend = components.backend
        self.tokenizer = components.tokenizer
        self.scheduler_config = components.scheduler_config
        self.vae_scale_factor = self.backend.vae_config.downscale_factor
        self.progress = progress
        self.decode_batch_size: int | None = None
        self.tiling: TileSpec | None = None
        self.release_text_encoder = False
        self.scheduler: Scheduler = self.set_scheduler(scheduler or default_scheduler_name(self.scheduler_config))

    @classmethod
    def from_pipeline(cls, other: "BaseDiffusion", **kwargs: Any) -> "BaseDiffusion":
        """A pipeline of this class on ``other``'s loaded model (no weights loaded twice), same sampler."""
        kwargs.setdefault("progress", other.progress)
        pipe = cls(components=other.components, **kwargs)
        if "scheduler" not in kwargs:
            pipe.set_scheduler(other.scheduler_name, **other.scheduler_overrides)
        return pipe

    # ----------------------------------------------------------------------------------- setup
    def set_scheduler(self, name: str, **overrides: Any) -> Scheduler:
        """Switch sampler by stablefused name, configured from the model's scheduler config + ``overrides``."""
        self.scheduler = make_scheduler(name, self.scheduler_config, **overrides)
        self.scheduler_name, self.scheduler_overrides = str(getattr(name, "value", name)).lower(), dict(overrides)
        return self.scheduler

    def enable_low_memory(self, enabled: bool = True) -> None:
        """Free the text encoder's weights after each prompt encoding (re-read lazily when next needed):
        the denoising loop and the VAE then run with only the UNet and VAE in memory."""
        self.release_text_encoder = enabled

    def enable_compile(self, enabled: bool = True) -> None:
        """Compile the UNet step into fused kernels (MLX: ``mx.compile``); pays most on Metal."""
        if not hasattr(self.backend, "compile_unet"):
            raise NotImplementedError(f"the {self.backend.name} backend has no compiled path")
        self.backend.compile_unet(enabled)

    def set_cpu_streams(self, count: int | None = None) -> int:
        """MLX on a CPU: run the guidance halves and VAE row bands on ``count`` cores at once (None: one
        per core, the default; 1: everything on one stream). Returns the count in use."""
        if not hasattr(self.backend, "set_cpu_streams"):
            raise NotImplementedError(f"the {self.backend.name} backend schedules its own threads")
        return self.backend.set_cpu_streams(count)

    def quantize(self, bits: int = 8, group_size: int = 64, components: Sequence[str] = ("unet",)) -> None:
        """Quantize the Linear layers of the UNet (and optionally the text encoder) to ``bits`` bits."""
        if not hasattr(self.backend, "quantize"):
            raise NotImplementedError(f"the {self.backend.name} backend has no quantized path")
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

    @property
    def latent_channels(self) -> int:
        return self.backend.vae_config.latent_channels

    def enable_attention_slicing(self, slice_size: int | None = 1024) -> None:
        """Attend in chunks of ``slice_size`` query tokens to cap attention memory (None: disable)."""
        self.backend.set_attention_chunk(slice_size)

    def disable_attention_slicing(self) -> None:
        self.backend.set_attention_chunk(None)

    # ------------------------------------------------------------------------------- validation
    def validate_size(self, height: int, width: int) -> None:
        f = self.vae_scale_factor
        for name, v in (("image_height", height), ("image_width", width)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
            if v % f:
                raise ValueError(f"{name}={v} is not a multiple of {f} (the VAE's downscale factor)")

    @staticmethod
    def validate_steps(num_inference_steps: int) -> None:
        if not isinstance(num_inference_steps, (int, np.integer)) or isinstance(num_inference_steps, bool) \
                or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")

    # ---------------------------------------------------------------------------------- prompts
    def prompt_pairs(self, prompt: PromptType, negative_prompt: PromptType | None) -> tuple[list[str], list[str]]:
        prompts = as_prompt_list(prompt)
        if negative_prompt is None:
            negatives = [""] * len(prompts)
        elif isinstance(negative_prompt, str):
            negatives = [negative_prompt] * len(prompts)
        else:
            negatives = as_prompt_list(negative_prompt, "negative_prompt")
            if len(negatives) != len(prompts):
                raise ValueError(f"{len(prompts)} prompt(s) but {len(negatives)} negative prompt(s); "
                                 "pass one negative prompt per prompt, or a single string")
        return prompts, negatives

    def expand_prompts(self, prompt: PromptType, negative_prompt: PromptType | None,
                       num_images_per_prompt: int) -> tuple[list[str], list[str]]:
        """Prompt pairs with each repeated ``num_images_per_prompt`` times, in diffusers' order (p0, p0, p1 ...)."""
        if not isinstance(num_images_per_prompt, (int, np.integer)) or isinstance(num_images_per_prompt, bool) \
                or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
        prompts, negatives = self.prompt_pairs(prompt, negative_prompt)
        k = int(num_images_per_prompt)
        return [p for p in prompts for _ in range(k)], [n for n in negatives for _ in range(k)]

    def prompt_to_embedding(self, prompt: PromptType, negative_prompt: PromptType | None = None) -> Array:
        """Text embeddings ``[uncond; cond]``, shape (2B, 77, D); ``negative_prompt`` defaults to ""."""
        prompts, negatives = self.prompt_pairs(prompt, negative_prompt)
        ids = np.concatenate([self.tokenizer(negatives), self.tokenizer(prompts)], axis=0)
        embedding = self.backend.encode_text(ids)
        if self.release_text_encoder:
            self.backend.release_text_encoder()
        return embedding

    # --------------------------------------------------------------------------------- guidance
    def classifier_free_guidance(self, prediction: Array, guidance_scale: float, guidance_rescale: float) -> Array:
        """``uncond + s * (cond - uncond)``, optionally rescaled toward cond's std (arXiv 2305.08891)."""
        b = prediction.shape[0] // 2
        uncond, cond = prediction[:b], prediction[b:]
        guided = uncond + (cond - uncond) * float(guidance_scale)
        if guidance_rescale > 0:
            std = self.backend.per_sample_std
            rescaled = guided * (std(cond) / std(guided))
            guided = rescaled * float(guidance_rescale) + guided * (1.0 - float(guidance_rescale))
        return guided

    # ------------------------------------------------------------------------------------ noise
    @staticmethod
    def make_rng(seed: int | np.random.Generator | None) -> np.random.Generator:
        if isinstance(seed, np.random.Generator):
            return seed
        if seed is not None and (not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0):
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        return np.random.default_rng(seed)

    @staticmethod
    def random_latent(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    @staticmethod
    def given_or_random(array: Any, shape: tuple[int, ...], rng: np.random.Generator, name: str) -> np.ndarray:
        """``array`` (checked against ``shape``) as float32 numpy, or a fresh standard-normal draw."""
        if array is None:
            return BaseDiffusion.random_latent(shape, rng)
        out = np.asarray(array, dtype=np.float32)
        if out.shape != tuple(shape):
            raise ValueError(f"{name} has shape {out.shape}; expected {tuple(shape)}")
        return out

    def start_index(self, num_inference_steps: int, start_step: int | None, strength: float | None) -> int:
        """Table index where a partial schedule starts: stablefused's ``start_step`` or diffusers' ``strength``.

        Both count sampler steps; two-evaluation samplers have two table entries per step.
        """
        n = int(num_inference_steps)
        if start_step is not None and strength is not None:
            raise ValueError("pass start_step or strength, not both")
        if strength is not None:
            if not 0.0 <= float(strength) <= 1.0:
                raise ValueError(f"strength must be in [0, 1], got {strength}")
            keep = min(int(n * float(strength)), n)
            if keep == 0:
                raise ValueError(f"strength={strength} with {n} steps leaves no denoising step; raise either")
            first = n - keep
        else:
            first = 0 if start_step is None else start_step
            if not isinstance(first, (int, np.integer)) or isinstance(first, bool) or not 0 <= first < n:
                raise ValueError(f"start_step must be an integer in [0, {n - 1}] for {n} steps, got {start_step!r}")
        return int(first) * self.scheduler.order

    # ------------------------------------------------------------------------------ the loop
    def denoise_steps(self, latent: Array, embedding: Array, guidance_scale: float, guidance_rescale: float,
                      rng: np.random.Generator, start_step: int = 0, conditioning: Array | None = None,
                      after_step: Callable[[int, Array], Array] | None = None) -> Iterator[Array]:
        """Run the sampler from table index ``start_step``; yield the latent after each step.

        ``embedding`` is ``[uncond; cond]``; at guidance_scale == 1 exactly the unconditional half
        cannot change the result and is skipped. ``conditioning`` (native, batch B) is appended to
        the UNet input's channels (inpainting UNets). ``after_step(i, latent)`` may replace the
        latent after step ``i`` (latent-blending inpainting).
        """
        scheduler, backend = self.scheduler, self.backend
        do_cfg = float(guidance_scale) != 1.0
        b = embedding.shape[0] // 2
        context = embedding if do_cfg else embedding[b:]
        public_shape = tuple(self.backend.latent_to_numpy(latent[:1]).shape[1:])
        noise_shape = (latent.shape[0],) + public_shape

        def noise() -> Array:
            return backend.latent_from_numpy(self.random_latent(noise_shape, rng))

        steps = range(start_step, len(scheduler.timesteps))
        for i in tqdm(steps, disable=not self.progress, desc="denoising", leave=False):
            x = scheduler.scale_model_input(latent, i)
            if conditioning is not None:
                x = backend.concat_channels([x, conditioning])
            prediction = self.model_prediction(backend.concat([x, x]) if do_cfg else x, float(scheduler.timesteps[i]),
                                               context)
            if do_cfg:
                prediction = self.classifier_free_guidance(prediction, guidance_scale, guidance_rescale)
            latent = scheduler.step(prediction, i, latent, noise)
            if after_step is not None:
                latent = after_step(i, latent)
            backend.evaluate(latent)
            yield latent

    def model_prediction(self, x: Array, timestep: float, context: Array) -> Array:
        """The UNet's prediction for the (CFG-batched) input; video pipelines add frame windows here."""
        return self.backend.unet(x, timestep, context)

    def run_sampler(self, latent: Array, embedding: Array, guidance_scale: float, guidance_rescale: float,
                    rng: np.random.Generator, start_step: int = 0, return_latent_history: bool = False,
                    **hooks: Any) -> list[Array]:
        """Run ``denoise_steps`` to the end; the final latent, or every latent from the start if asked."""
        history = [latent]
        for latent in self.denoise_steps(latent, embedding, guidance_scale, guidance_rescale, rng, start_step,
                                         **hooks):
            if return_latent_history:
                history.append(latent)
        return history if return_latent_history else [latent]

    def sample_from_noise(self, embedding: Array, noise: np.ndarray, num_inference_steps: int, guidance_scale: float,
                          guidance_rescale: float, rng: np.random.Generator,
                          return_latent_history: bool = False) -> list[Array]:
        """The full schedule from initial noise (B, C, h, w) numpy, scaled by the sampler's initial sigma."""
        self.scheduler.set_timesteps(num_inference_steps)
        x = self.backend.latent_from_numpy(noise * np.float32(self.scheduler.init_noise_sigma))
        return self.run_sampler(x, embedding, guidance_scale, guidance_rescale, rng,
                                return_latent_history=return_latent_history)

    # ------------------------------------------------------------------------------------- VAE
    def latent_to_image(self, latent: Array | np.ndarray, output_type: str = "pil",
                        decode_batch_size: int | None = None) -> Any:
        """Decode scaled latents (native, or numpy (B, C, h, w)) to images of ``output_type``."""
        self._check_output_type(output_type)
        if isinstance(latent, np.ndarray):
            latent = self.backend.latent_from_numpy(latent)
        if output_type == "latent":
            return self.backend.latent_to_numpy(latent)
        cfg = self.backend.vae_config
        n = latent.shape[0]
        step = decode_batch_size or self.decode_batch_size or n
        chunks = []
        for s in range(0, n, step):
            z = latent[s:s + step] * (1.0 / cfg.scaling_factor)
            if cfg.shift_factor:
                z = z + cfg.shift_factor
            chunks.append(self._decode(z))
        images = denormalize(np.concatenate(chunks, axis=0)).astype(np.float32)
        return self._format_images(images, output_type)

    def _decode(self, z: Array) -> np.ndarray:
        """Unscaled native latents -> (B, H, W, 3) numpy, tiled when enabled and the latent exceeds a tile."""
        backend, spec = self.backend, self.tiling
        if spec is None:
            return backend.images_to_numpy(backend.vae_decode(z))
        public = backend.latent_to_numpy(z)
        if max(public.shape[2:]) <= spec.latent_size:
            return backend.images_to_numpy(backend.vae_decode(z))
        return tiled_decode(public, lambda t: backend.images_to_numpy(backend.vae_decode(backend.latent_from_numpy(t))),
                            spec)

    def _encode_mean(self, images: np.ndarray) -> Array:
        """(B, H, W, 3) numpy in [-1, 1] -> unscaled native posterior mean, tiled when enabled."""
        backend, spec = self.backend, self.tiling
        if spec is None or max(images.shape[1:3]) <= spec.sample_size:
            return backend.vae_encode(backend.images_from_numpy(images))[0]

        def encode(tile: np.ndarray) -> np.ndarray:
            mean = backend.vae_encode(backend.images_from_numpy(np.ascontiguousarray(tile.transpose(0, 2, 3, 1))))[0]
            return backend.latent_to_numpy(mean).transpose(0, 2, 3, 1)

        mean = tiled_encode(np.ascontiguousarray(images.transpose(0, 3, 1, 2)), encode, spec)
        return backend.latent_from_numpy(np.ascontiguousarray(mean.transpose(0, 3, 1, 2)))

    def _format_images(self, images: np.ndarray, output_type: str) -> Any:
        if output_type == "np":
            return images
        if output_type == "pil":
            return numpy_to_pil(images)
        return self.backend.images_from_numpy(images)  # the backend's native array type

    def image_to_latent(self, image: Image.Image | Sequence[Image.Image] | np.ndarray | str | Path,
                        size: tuple[int, int] | None = None) -> Array:
        """Scaled latent of ``image``: mapped to [-1, 1], posterior mean times the VAE scaling factor."""
        return self.pixels_to_latent(self.preprocess_image(image, size))

    def pixels_to_latent(self, pixels: np.ndarray) -> Array:
        """(B, H, W, 3) float pixels in [0, 1] -> scaled posterior-mean latents (native)."""
        mean = self._encode_mean(normalize(pixels))
        cfg = self.backend.vae_config
        if cfg.shift_factor:
            mean = mean - cfg.shift_factor
        return mean * cfg.scaling_factor

    def preprocess_image(self, image: Any, size: tuple[int, int] | None = None) -> np.ndarray:
        """An image or batch -> (B, H, W, 3) float32 in [0, 1].

        Accepts a path, a PIL image, a list of either, or a (B,)H,W,3 numpy array (uint8, or float in
        [0, 1]). ``size=(height, width)`` resizes (Lanczos); without it the size must be a multiple of 8.
        """
        pixels = load_pixels(image, size)
        h, w = pixels.shape[1:3]
        f = self.vae_scale_factor
        if h % f or w % f:
            raise ValueError(f"image is {w}x{h} (width x height); both must be multiples of {f}. "
                             "Pass image_height/image_width to resize it.")
        return pixels

    # --------------------------------------------------------------------------------- outputs
    def _check_output_type(self, output_type: str) -> None:
        allowed = OUTPUT_TYPES + (self.backend.native_output_type,)
        if output_type not in allowed:
            raise ValueError(f"unknown output_type {output_type!r}; expected one of {allowed}")

    def resolve_output(self, latents: list[Array], output_type: str, return_latent_history: bool) -> Any:
        """Final latent -> images; with history, every step's latent per prompt: (B, steps+1, ...)."""
        if not return_latent_history:
            return self.latent_to_image(latents[-1], output_type)
        if output_type == "latent":
            return np.stack([self.backend.latent_to_numpy(x) for x in latents], axis=1)
        frames = [self.latent_to_image(x, "np") for x in latents]  # each (B, H, W, 3)
        history = np.stack(frames, axis=1)  # (B, steps+1, H, W, 3)
        if output_type == "np":
            return history
        if output_type == "pil":
            return [numpy_to_pil(row) for row in history]
        return self.backend.images_from_numpy(history)
