"""Text-to-video: AnimateDiff motion modules on a Stable Diffusion 1.x model, or a ModelScope /
Zeroscope UNet3D model; the model itself says which.

stablefused's keyword API (``video_height``, ``video_width``, ``video_frames``, ``decode_batch_size``)
plus ``motion_adapter=``, ``seed=``, ``latent=`` (B, 4, F, h, w) and sliding context windows for
videos longer than a motion module's maximum frame count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dataclasses import replace

from ..conditioning import Conditioning
from ..motion_adapters import resolve_motion_adapter
from . import inputs
from .base import Array, BaseDiffusion, ModelComponents, PromptType, with_run_settings
from .context_windows import ContextWindows
from .data_parallel import ParallelCall, Shard
from .denoise import Guidance, StepCallback
from .sdxl_conditioning import check_sdxl_keywords, sdxl_inputs
from .stablefused_compat import folder_from_components, resolve_dtype

# AnimateDiff's sampler: DDIM on *linear* betas (not SD's scaled_linear), no clipping, linspace spacing.
ANIMATEDIFF_DDIM = {"beta_schedule": "linear", "clip_sample": False, "timestep_spacing": "linspace",
                    "steps_offset": 1}
DEFAULT_VIDEO_ATTENTION_CHUNK = 512


class TextToVideoDiffusion(BaseDiffusion):
    def __init__(self, model_id: str | Path | None = None, *, motion_adapter: str | Path | None = None,
                 components: ModelComponents | None = None, backend: str = "auto", dtype: str = "float32",
                 device: str | None = None, variant: str | None = None, revision: str | None = None,
                 use_cache: bool = True, local_files_only: bool = False, scheduler: Any = None,
                 progress: bool = True, adapter_variant: str | None = None,
                 motion_adapter_config: dict | None = None, torch_dtype: Any = None, tokenizer: Any = None,
                 text_encoder: Any = None, vae: Any = None, unet: Any = None, distributed: bool = True,
                 guidance_parallel: bool = False, controlnet: Any = None,
                 **model_files: Any) -> None:
        """``model_id``: an SD 1.x model; ``motion_adapter``: a MotionAdapter folder or hub id, or an original
        AnimateDiff checkpoint (.ckpt / .safetensors; ``motion_adapter_config`` may give MotionAdapter
        config entries such a file cannot store, e.g. ``motion_num_attention_heads``). The default
        sampler is AnimateDiff's DDIM (``ANIMATEDIFF_DDIM``); ``scheduler=`` or ``set_scheduler`` choose another.
        stablefused's ``torch_dtype=`` and component objects (a UNet3D model's) work as in ``BaseDiffusion``, and
        so do ``vae=`` as a path and ``model_files`` (``config=``, ``use_ema=``, ``prediction_type=``)."""
        dtype = resolve_dtype(dtype, torch_dtype)
        if isinstance(vae, (str, Path)):  # a VAE file or folder for model_id (BaseDiffusion's vae=)
            model_files["vae"], vae = vae, None
        if any(c is not None for c in (tokenizer, text_encoder, vae, unet)):
            if model_id is not None or components is not None:
                raise ValueError("pass model_id, components, or the five component objects; not several")
            model_id = folder_from_components(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet,
                                              scheduler=scheduler)
        if components is None:
            if model_id is None:
                raise ValueError("pass model_id (and motion_adapter), or components")
            adapter = None if motion_adapter is None else resolve_motion_adapter(
                motion_adapter, variant=adapter_variant, local_files_only=local_files_only,
                config=motion_adapter_config)
            components = ModelComponents.load(model_id, backend=backend, dtype=dtype, device=device, variant=variant,
                                              revision=revision, use_cache=use_cache, local_files_only=local_files_only,
                                              motion_adapter=adapter, **model_files)  # vae=, config=, use_ema=, ...
        elif model_id is not None:
            raise ValueError("pass exactly one of model_id (to load a model) or components (to share one)")
        super().__init__(components=components, scheduler=scheduler, progress=progress, distributed=distributed,
                         guidance_parallel=guidance_parallel, controlnet=controlnet)
        if not self.backend.is_video_unet:
            raise ValueError("text-to-video needs a video model: pass motion_adapter= (e.g. "
                             "'guoyww/animatediff-motion-adapter-v1-5-2' or an mm_sd_v15*.ckpt file) for an SD "
                             "model, or load a UNet3D model (cerspense/zeroscope_v2_576w)")
        if scheduler is None and self.backend.motion_config is not None:
            self.set_scheduler("ddim", **ANIMATEDIFF_DDIM)  # AnimateDiff's sampler; UNet3D models keep their own
        self.context_windows: ContextWindows | None = None
        # 16 frames with guidance make a UNet batch of 32; query chunks keep the 64x64 self-attention scores
        # (head size 40 has no fused kernel) at 32*8*512*4096 fp16 = 1 GB instead of 8.6 GB. A setting of
        # this pipeline only: an image pipeline sharing the components keeps its own.
        self.enable_attention_slicing(DEFAULT_VIDEO_ATTENTION_CHUNK)

    def set_motion_norm(self, per_frame: bool) -> None:
        """``per_frame=True``: the original AnimateDiff repo's motion GroupNorm (statistics per frame);
        False (default): diffusers' (statistics across all frames of a video)."""
        if self.backend.motion_config is None:
            raise NotImplementedError("this model has no motion modules (a UNet3D model)")
        self.settings = replace(self.settings, motion_norm_per_frame=bool(per_frame))

    @property
    def max_frames(self) -> int | None:
        """The motion module's frame limit (None: a UNet3D, which has no positional table)."""
        motion = self.backend.motion_config
        return None if motion is None else int(motion.max_seq_length)

    def enable_context_windows(self, length: int = 16, stride: int = 4, weighting: str = "pyramid") -> None:
        """Generate any number of frames: the UNet sees overlapping windows of ``length`` frames."""
        if self.max_frames is not None and length > self.max_frames:
            raise ValueError(f"context length {length} exceeds the motion module's maximum of {self.max_frames}")
        self.context_windows = ContextWindows(length, stride, weighting)

    def disable_context_windows(self) -> None:
        self.context_windows = None

    @with_run_settings
    def __call__(self, prompt: PromptType, video_height: int = 512, video_width: int = 512, video_frames: int = 24,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, guidance_rescale: float = 0.0,
                 negative_prompt: PromptType | None = None, latent: np.ndarray | None = None,
                 output_type: str = "pil", decode_batch_size: int = 4, seed: int | None = None,
                 num_videos_per_prompt: int = 1, callback_on_step_end: StepCallback | list | None = None,
                 control_image: Any = None, controlnet_conditioning_scale: float | list[float] = 1.0,
                 control_guidance_start: float | list[float] = 0.0, control_guidance_end: float | list[float] = 1.0,
                 guess_mode: bool = False, ip_adapter_image: Any = None,
                 ip_adapter_image_embeds: Any = None, **sdxl: Any) -> Any:
        """Videos for ``prompt``: "pil" a list of frame lists, "np" (B, F, H, W, 3), "latent" (B, 4, F, h, w).

        With a ControlNet (AnimateDiff, as diffusers' AnimateDiffControlNetPipeline): ``control_image`` one image
        per frame (a list, or (F, H, W, 3)), with several ControlNets a list of such lists; the other keywords
        as the image pipelines take them (``pipelines/controlnet.py``). ``ip_adapter_image``: an image prompt for a
        loaded IP-Adapter, the same for every frame. An SDXL model with an SDXL motion adapter (AnimateDiff-SDXL)
        takes text-to-image's SDXL keywords (``prompt_2``, ``negative_prompt_2``, the micro-conditioning, one
        set for every frame)."""
        arguments = {k: v for k, v in locals().items() if k != "self"}
        # 1. Check inputs.
        self._begin()
        self._check_output_type(output_type)
        self.validate_steps(num_inference_steps)
        guidance = Guidance(guidance_scale, guidance_rescale)
        decode_batch_size = inputs.positive_int(decode_batch_size, "decode_batch_size")
        prompts, negatives = inputs.expand_prompts(prompt, negative_prompt, num_videos_per_prompt,
                                                   "num_videos_per_prompt")
        f = self.vae_scale_factor
        if latent is not None:
            shape = np.shape(latent)
            if len(shape) != 5:
                raise ValueError(f"latent must be (B, C, F, h, w), got shape {shape}")
            video_frames, video_height, video_width = shape[2], shape[3] * f, shape[4] * f
        inputs.check_size(video_height, video_width, f, ("video_height", "video_width"))
        video_frames = inputs.positive_int(video_frames, "video_frames")
        self.check_memory(video_height, video_width, len(prompts), video_frames, ("video_height", "video_width"))
        if self.max_frames is not None and video_frames > self.max_frames and self.context_windows is None:
            raise ValueError(f"{video_frames} frames exceed the motion module's maximum of {self.max_frames}; "
                             "generate fewer, or call enable_context_windows() for longer videos")
        control = self.prepare_control(control_image, controlnet_conditioning_scale, control_guidance_start,
                                       control_guidance_end, guess_mode, (video_height, video_width),
                                       len(prompts) // num_videos_per_prompt, num_videos_per_prompt, guidance.enabled,
                                       frames=video_frames)
        if control is not None and self._predictor(video_frames) is not None:
            raise ValueError("ControlNets do not run over context windows yet: generate at most one window of "
                             "frames, or call disable_context_windows()")
        shape = (len(prompts), self.latent_channels, video_frames, video_height // f, video_width // f)
        parallel = ParallelCall.begin(self, "TextToVideoDiffusion.__call__", arguments, seed)  # under a launch
        rng = inputs.make_rng(parallel.seed)
        noise = inputs.given_or_random(latent, shape, rng, "latent (B, C, F, h, w)")
        image_prompt = self.check_image_prompt(ip_adapter_image, ip_adapter_image_embeds, len(prompts), guidance.enabled)
        sdxl_call = sdxl_inputs(self, negative_prompt, video_height, video_width, text_to_image=True,
                                **check_sdxl_keywords(sdxl))
        # 2. Encode the prompt (and the image prompt).
        positive, negative = self.encode_prompt(prompts, negatives, sdxl_call, num_videos_per_prompt)
        positive, negative = self.add_image_prompt(positive, negative, image_prompt)
        # 3. Prepare timesteps and latents.
        self.scheduler.set_timesteps(num_inference_steps)
        predict = self._predictor(video_frames, parallel)  # context windows: under a launch, spread over the ranks

        def generate(shard: Shard, output: str) -> Any:  # all videos, or (no context windows) this rank's window
            latents = self.backend.latent_from_numpy(shard.take(noise) * np.float32(self.scheduler.init_noise_sigma))
            # 4. Denoise (over context windows when enabled).
            final = self.run_denoise(latents, shard.take(positive), shard.take(negative), guidance, rng,
                                     predict=predict, callback_on_step_end=callback_on_step_end,
                                     step_conditioning=shard.take(control),
                                     step_noise=shard.noise_source)[-1]
            # 5. Decode.
            return self.video_output(final, output, decode_batch_size)

        if predict is not None and parallel.splits_data:  # the ranks share each step's windows instead
            return generate(Shard(len(prompts)), output_type)
        return parallel.map_batch(len(prompts), generate, output_type)

    generate = __call__

    def _predictor(self, frames: int, parallel: ParallelCall | None = None):
        """The UNet over the whole video, or over overlapping context windows blended per frame. Under a
        launch each rank runs its share of a step's windows; all predictions are exchanged and every rank
        blends them in the same order as one process."""
        windows = self.context_windows.windows(frames) if self.context_windows else None
        if not windows or len(windows) == 1:
            return None
        backend, spans = self.backend, self.context_windows
        weight_sum = np.zeros(frames, np.float32)
        for start, stop in windows:
            weight_sum[start:stop] += spans.weights(stop - start)

        def predict(x: Array, timestep: float, conditioning: Conditioning) -> Array:
            def window(k: int) -> Array:
                return backend.unet(backend.take_frames(x, *windows[k]), timestep, conditioning)

            total = None
            parts = (window(k) for k in range(len(windows))) if parallel is None else parallel.each(len(windows), window)
            for (start, stop), part in zip(windows, parts):
                part = part * backend.frame_weights(spans.weights(stop - start), part.ndim)
                part = backend.pad_frames(part, start, frames - stop)
                total = part if total is None else total + part
            return total / backend.frame_weights(weight_sum, total.ndim)

        return predict

    @with_run_settings
    def video_output(self, latent: Array, output_type: str, decode_batch_size: int = 4) -> Any:
        """Native (or numpy) video latents -> ``output_type``, decoded ``decode_batch_size`` frames at a time."""
        self._check_output_type(output_type)
        if isinstance(latent, np.ndarray):
            latent = self.backend.latent_from_numpy(latent)
        return self.vae_io.output(latent, output_type, decode_batch_size)
