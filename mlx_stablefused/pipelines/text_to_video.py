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

from ..motion_adapters import resolve_motion_adapter
from ..utils.images import numpy_to_pil
from .base import Array, BaseDiffusion, ModelComponents, PromptType
from .context_windows import ContextWindows

# AnimateDiff's sampler: DDIM on *linear* betas (not SD's scaled_linear), no clipping, linspace spacing.
ANIMATEDIFF_DDIM = {"beta_schedule": "linear", "clip_sample": False, "timestep_spacing": "linspace",
                    "steps_offset": 1}
DEFAULT_VIDEO_ATTENTION_CHUNK = 512


class TextToVideoDiffusion(BaseDiffusion):
    def __init__(self, model_id: str | Path | None = None, *, motion_adapter: str | Path | None = None,
                 components: ModelComponents | None = None, backend: str = "mlx", dtype: str = "float32",
                 device: str | None = None, variant: str | None = None, revision: str | None = None,
                 use_cache: bool = True, local_files_only: bool = False, scheduler: str | None = None,
                 progress: bool = True, adapter_variant: str | None = None,
                 motion_adapter_config: dict | None = None) -> None:
        """``model_id``: an SD 1.x model; ``motion_adapter``: a MotionAdapter folder or hub id, or an original
        AnimateDiff checkpoint (.ckpt / .safetensors; ``motion_adapter_config`` may give MotionAdapter
        config entries such a file cannot store, e.g. ``motion_num_attention_heads``). The default
        sampler is AnimateDiff's DDIM (``ANIMATEDIFF_DDIM``); ``scheduler=`` or ``set_scheduler`` choose another."""
        if components is None:
            if model_id is None:
                raise ValueError("pass model_id (and motion_adapter), or components")
            adapter = None if motion_adapter is None else resolve_motion_adapter(
                motion_adapter, variant=adapter_variant, local_files_only=local_files_only,
                config=motion_adapter_config)
            components = ModelComponents.load(model_id, backend=backend, dtype=dtype, device=device, variant=variant,
                                              revision=revision, use_cache=use_cache, local_files_only=local_files_only,
                                              motion_adapter=adapter)
        elif model_id is not None:
            raise ValueError("pass exactly one of model_id (to load a model) or components (to share one)")
        super().__init__(components=components, scheduler=scheduler, progress=progress)
        if not self.backend.is_video_unet:
            raise ValueError("text-to-video needs a video model: pass motion_adapter= (e.g. "
                             "'guoyww/animatediff-motion-adapter-v1-5-2' or an mm_sd_v15*.ckpt file) for an SD "
                             "model, or load a UNet3D model (cerspense/zeroscope_v2_576w)")
        if scheduler is None and self.backend.motion_config is not None:
            self.set_scheduler("ddim", **ANIMATEDIFF_DDIM)  # AnimateDiff's sampler; UNet3D models keep their own
        self.context_windows: ContextWindows | None = None
        # 16 frames with guidance make a UNet batch of 32; query chunks keep the 64x64 self-attention scores
        # (head size 40 has no fused kernel) at 32*8*512*4096 fp16 = 1 GB instead of 8.6 GB.
        self.enable_attention_slicing(DEFAULT_VIDEO_ATTENTION_CHUNK)

    def set_motion_norm(self, per_frame: bool) -> None:
        """``per_frame=True``: the original AnimateDiff repo's motion GroupNorm (statistics per frame);
        False (default): diffusers' (statistics across all frames of a video)."""
        self.backend.set_motion_norm_per_frame(per_frame)

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

    def __call__(self, prompt: PromptType, video_height: int = 512, video_width: int = 512, video_frames: int = 16,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, guidance_rescale: float = 0.0,
                 negative_prompt: PromptType | None = None, latent: np.ndarray | None = None,
                 output_type: str = "pil", decode_batch_size: int = 4, seed: int | None = None,
                 num_videos_per_prompt: int = 1) -> Any:
        """Videos for ``prompt``: "pil" a list of frame lists, "np" (B, F, H, W, 3), "latent" (B, 4, F, h, w)."""
        self._check_output_type(output_type)
        self.validate_steps(num_inference_steps)
        if not isinstance(decode_batch_size, int) or decode_batch_size < 1:
            raise ValueError(f"decode_batch_size must be a positive integer, got {decode_batch_size!r}")
        prompts, negatives = self.expand_prompts(prompt, negative_prompt, num_videos_per_prompt)
        f = self.vae_scale_factor
        if latent is not None:
            shape = np.shape(latent)
            if len(shape) != 5:
                raise ValueError(f"latent must be (B, C, F, h, w), got shape {shape}")
            video_frames, video_height, video_width = shape[2], shape[3] * f, shape[4] * f
        self.validate_size(video_height, video_width)
        if not isinstance(video_frames, (int, np.integer)) or video_frames < 1:
            raise ValueError(f"video_frames must be a positive integer, got {video_frames!r}")
        if self.max_frames is not None and video_frames > self.max_frames and self.context_windows is None:
            raise ValueError(f"{video_frames} frames exceed the motion module's maximum of {self.max_frames}; "
                             "generate fewer, or call enable_context_windows() for longer videos")
        shape = (len(prompts), self.latent_channels, int(video_frames), video_height // f, video_width // f)
        rng = self.make_rng(seed)
        noise = self.given_or_random(latent, shape, rng, "latent (B, C, F, h, w)")
        embedding = self.prompt_to_embedding(prompts, negatives)
        final = self.sample_from_noise(embedding, noise, num_inference_steps, guidance_scale, guidance_rescale, rng)[-1]
        return self.video_output(final, output_type, decode_batch_size)

    generate = __call__

    def model_prediction(self, x: Array, timestep: float, context: Array) -> Array:
        windows = self.context_windows.windows(self._frames(x)) if self.context_windows else None
        if not windows or len(windows) == 1:
            return self.backend.unet(x, timestep, context)
        backend = self.backend
        public = backend.latent_to_numpy(x)  # (B, C, F, h, w)
        total = np.zeros_like(public)
        weight_sum = np.zeros(public.shape[2], np.float32)
        for start, stop in windows:
            part = backend.unet(backend.latent_from_numpy(public[:, :, start:stop]), timestep, context)
            w = self.context_windows.weights(stop - start)
            total[:, :, start:stop] += backend.latent_to_numpy(part) * w[None, None, :, None, None]
            weight_sum[start:stop] += w
        return backend.latent_from_numpy(total / weight_sum[None, None, :, None, None])

    def _frames(self, x: Array) -> int:
        return int(self.backend.latent_to_numpy(x[:1]).shape[2])

    def video_output(self, latent: Array, output_type: str, decode_batch_size: int = 4) -> Any:
        public = self.backend.latent_to_numpy(latent)  # (B, C, F, h, w)
        if output_type == "latent":
            return public
        b, c, frames, h, w = public.shape
        flat = public.transpose(0, 2, 1, 3, 4).reshape(b * frames, c, h, w)
        images = self.latent_to_image(flat, "np", decode_batch_size=decode_batch_size)
        videos = images.reshape(b, frames, *images.shape[1:])
        if output_type == "np":
            return videos
        if output_type == "pil":
            return [numpy_to_pil(v) for v in videos]
        native = self.backend.images_from_numpy(images)
        return native.reshape(b, frames, *native.shape[1:])
