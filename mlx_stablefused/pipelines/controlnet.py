"""ControlNet on every pipeline: ``controlnet=`` / ``set_controlnet`` and diffusers' call keywords
(``control_image``, ``controlnet_conditioning_scale``, ``control_guidance_start`` / ``_end``, ``guess_mode``).

The pipelines stay flat recipes: ``prepare_control`` checks and prepares the control inputs with the other
inputs, before any work, and returns a ``ControlStep``; the sampling core (``denoise``) calls it before every
UNet evaluation, and it runs each ControlNet whose guidance window covers the step and puts the summed
residuals into that step's ``Conditioning`` (as diffusers' ControlNet pipelines and ``MultiControlNetModel``).
Written once for every backend: native arrays are touched through ``Backend`` methods and arithmetic only.

Control images must have the output's size (text-to-image without ``image_height`` / ``image_width`` takes
the control image's): a map of another size is refused rather than resampled, since resampling an edge or
pose map moves and blurs the very edges it carries. Resize it yourself when that is what you want.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..backends.base import Array, Backend, as_numpy
from ..conditioning import Conditioning
from ..controlnets import ControlNet, check_fits, load_controlnet
from ..utils.array_types import is_mlx, is_torch
from ..validation import finite_float, fraction
from . import inputs

def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _per_controlnet(value: Any, n: int, name: str) -> list:
    """One value for every ControlNet, or a list with one per ControlNet (as diffusers)."""
    if not isinstance(value, (list, tuple)):
        return [value] * n
    if len(value) != n:
        raise ValueError(f"{name} has {len(value)} entries for {n} ControlNet{'s' * (n != 1)}; give one value, "
                         "or one per ControlNet")
    return list(value)


def read_control_image(image: Any, factor: int, name: str) -> np.ndarray:
    """A control image or batch -> (B, H, W, 3) float32. Paths and PIL images on [0, 1]; arrays and tensors
    (numpy (B,)H,W,3; torch / MLX (B,)3,H,W) taken as they are, as diffusers' control image processor does
    (an inpainting ControlNet's map has -1 where the mask is)."""
    if is_torch(image) or is_mlx(image) or (isinstance(image, np.ndarray) and image.dtype != np.uint8):
        arr = as_numpy(image)
        arr = arr[None] if arr.ndim == 3 else arr
        if arr.ndim == 4 and (is_torch(image) or is_mlx(image)):
            arr = arr.transpose(0, 2, 3, 1)
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"{name}: arrays must be (B, H, W, 3) or (H, W, 3) (tensors (B, 3, H, W)), "
                             f"got {tuple(np.shape(image))}")
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} must not contain NaN or infinite values")
        if arr.shape[1] % factor or arr.shape[2] % factor:
            raise ValueError(f"{name} is {arr.shape[2]}x{arr.shape[1]} (width x height); both must be multiples "
                             f"of {factor}")
        return np.ascontiguousarray(arr, dtype=np.float32)
    return inputs.load_image(image, factor)


@dataclass
class ControlStep:
    """Each step's ControlNet residuals (see ``denoise.StepConditioning``): ControlNet ``k`` runs at scale
    ``scales[k]`` while the step lies in its window [``starts[k]``, ``ends[k]``] of the schedule, on its control
    ``images[k]`` (native, one per UNet input row: both guidance halves, or in guess mode the conditional one)."""

    backend: Backend
    controlnets: list[ControlNet]
    images: list[Array]
    scales: list[float]
    starts: list[float]
    ends: list[float]
    guess_mode: bool
    guided: bool
    rows_per_item: int = 1  # a video's frames: its control images are one per frame, video-major

    def __getitem__(self, items: slice) -> "ControlStep":
        """The control of a part of the batch (a rank's window: ``data_parallel.Shard.take``), in each guidance
        half when the images hold both."""
        rows = slice(items.start * self.rows_per_item, items.stop * self.rows_per_item)

        def part(image: Array) -> Array:
            if self.guided and not self.guess_mode:
                half = image.shape[0] // 2
                return self.backend.concat([image[:half][rows], image[half:][rows]])
            return image[rows]

        return replace(self, images=[part(image) for image in self.images])

    def __call__(self, step: int, steps: int, x: Array, timestep: float, conditioning: Conditioning) -> Conditioning:
        half = x.shape[0] // 2
        only_cond = self.guess_mode and self.guided  # diffusers: guess mode feeds the conditional half alone
        x_in, cond_in = (x[half:], conditioning[half:]) if only_cond else (x, conditioning)
        down = mid = None
        for net, image, scale, start, end in zip(self.controlnets, self.images, self.scales, self.starts, self.ends):
            keep = 0.0 if (step / steps < start or (step + 1) / steps > end) else 1.0
            if scale * keep == 0.0:  # diffusers adds its residuals times 0: the same as none
                continue
            d, m = self.backend.controlnet(net.module, x_in, timestep, cond_in, image, scale * keep, self.guess_mode)
            down = list(d) if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        if down is None:
            return conditioning
        if only_cond:  # the unconditional half gets none (diffusers: zeros)
            down = [self.backend.concat([r * 0.0, r]) for r in down]
            mid = self.backend.concat([mid * 0.0, mid])
        return replace(conditioning, down_block_residuals=tuple(down), mid_block_residual=mid)


class ControlNetMixin:
    """``controlnet=`` on the constructor, ``set_controlnet`` and ``prepare_control`` for the pipelines."""

    controlnets: list[ControlNet]  # set by set_controlnet (BaseDiffusion.__init__ calls it)

    def set_controlnet(self, controlnet: Any, *, config: str | Path | None = None, subfolder: str | None = None,
                       variant: str | None = None, revision: str | None = None,
                       local_files_only: bool = False) -> None:
        """Use ``controlnet`` from the next call on, without reloading the base model: a diffusers ControlNet
        folder, a hub id (``lllyasviel/control_v11p_sd15_canny``), an original single file (``.pth`` /
        ``.safetensors``, ``control_model.*`` keys; ``config=`` a ControlNet folder or hub id for its config),
        a ``ControlNet`` another pipeline loaded (``pipe.controlnet``), a list of these (several ControlNets,
        their residuals summed), or None to drop them. Each is checked against the loaded model before its
        weights are read."""
        import inspect

        if controlnet is not None and "control_image" not in inspect.signature(type(self).__call__).parameters:
            raise ValueError(f"{type(self).__name__} takes no ControlNet (text-to-image, image-to-image, inpainting "
                             "and text-to-video do)")
        loaded = []
        for spec in ([] if controlnet is None else _as_list(controlnet)):
            if isinstance(spec, ControlNet):
                check_fits(self.backend, spec.plan, spec.config, spec.origin)
                loaded.append(spec)
            else:
                from ..demo import resolve_special_id

                if isinstance(spec, str) and resolve_special_id(spec) != spec:  # demo:controlnet
                    from ..controlnets import ControlNetSource

                    spec = ControlNetSource(resolve_special_id(spec), spec)
                loaded.append(load_controlnet(self.backend, spec, config=config, subfolder=subfolder,
                                              variant=variant, revision=revision, local_files_only=local_files_only))
        self.controlnets = loaded

    @property
    def controlnet(self) -> ControlNet | list[ControlNet] | None:
        """The ControlNet in use (a list when several; None when none)."""
        if not self.controlnets:
            return None
        return self.controlnets[0] if len(self.controlnets) == 1 else list(self.controlnets)

    def control_image_size(self, control_image: Any) -> tuple[int, int] | None:
        """The (height, width) of the first control image (text-to-image's default size); None without one."""
        if control_image is None or not self.controlnets:
            return None
        first = _as_list(control_image)[0] if len(self.controlnets) > 1 else control_image
        first = _as_list(first)[0] if isinstance(first, (list, tuple)) else first
        return tuple(read_control_image(first, self.vae_scale_factor, "control_image").shape[1:3])

    def prepare_control(self, control_image: Any, conditioning_scale: Any, guidance_start: Any, guidance_end: Any,
                        guess_mode: Any, size: tuple[int, int], num_prompts: int, per_prompt: int, guided: bool,
                        frames: int | None = None) -> ControlStep | None:
        """Check the control inputs and prepare the images (before any work); None without ControlNets.
        ``frames``: a video's frame count (one control image per frame, the same frames for every video)."""
        n = len(self.controlnets)
        if n == 0:
            if control_image is not None:
                raise ValueError("control_image was given but no ControlNet is loaded; pass controlnet= to the "
                                 "pipeline or call set_controlnet()")
            return None
        if control_image is None:
            raise ValueError(f"the pipeline has {n} ControlNet{'s' * (n != 1)}: pass control_image "
                             f"({'one image' if n == 1 else 'a list with one image per ControlNet'})")
        if not isinstance(guess_mode, bool):
            raise ValueError(f"guess_mode must be True or False, got {guess_mode!r}")
        per_net = [control_image] if n == 1 else self._images_per_controlnet(control_image, n)
        scales = [finite_float(s, "controlnet_conditioning_scale")
                  for s in _per_controlnet(conditioning_scale, n, "controlnet_conditioning_scale")]
        starts = [fraction(s, "control_guidance_start") for s in _per_controlnet(guidance_start, n,
                                                                                  "control_guidance_start")]
        ends = [fraction(e, "control_guidance_end") for e in _per_controlnet(guidance_end, n, "control_guidance_end")]
        for s, e in zip(starts, ends):
            if s >= e:
                raise ValueError(f"control_guidance_start={s} must be below control_guidance_end={e}")
        guess_mode = guess_mode or all(net.config.global_pool_conditions for net in self.controlnets)
        images = []
        for k, image in enumerate(per_net):
            name = "control_image" if n == 1 else f"control_image[{k}]"
            pixels = self._control_pixels(image, size, num_prompts, per_prompt, frames, name)
            native = self.backend.images_from_numpy(pixels)
            images.append(self.backend.concat([native, native]) if guided and not guess_mode else native)
        return ControlStep(self.backend, list(self.controlnets), images, scales, starts, ends, guess_mode, guided,
                           rows_per_item=frames or 1)

    @staticmethod
    def _images_per_controlnet(control_image: Any, n: int) -> list:
        if not isinstance(control_image, (list, tuple)):
            raise ValueError(f"{n} ControlNets need a list of {n} control images (one per ControlNet), got one image")
        if len(control_image) != n:
            more = "more" if len(control_image) > n else "fewer"
            raise ValueError(f"{len(control_image)} control images for {n} ControlNets ({more} images than "
                             "ControlNets); pass one per ControlNet, in the order of controlnet=")
        return list(control_image)

    def _control_pixels(self, image: Any, size: tuple[int, int], num_prompts: int, per_prompt: int,
                        frames: int | None, name: str) -> np.ndarray:
        """(rows, H, W, 3) in [0, 1]: one per image of the batch (or per frame of every video), of ``size``."""
        pixels = read_control_image(image, self.vae_scale_factor, name)
        if tuple(pixels.shape[1:3]) != tuple(size):
            raise ValueError(f"{name} is {pixels.shape[2]}x{pixels.shape[1]} but the output is {size[1]}x{size[0]} "
                             "(width x height); control images must have the output's size (resize the map, or "
                             "leave image_height/image_width unset for text-to-image to take its size)")
        if frames is not None:
            if pixels.shape[0] != frames:
                raise ValueError(f"{name} has {pixels.shape[0]} frames for a {frames}-frame video; pass one control "
                                 "image per frame")
            return np.tile(pixels, (num_prompts * per_prompt, 1, 1, 1))  # the frames of every video, video-major
        if pixels.shape[0] not in (1, num_prompts):
            raise ValueError(f"{name} holds {pixels.shape[0]} images for {num_prompts} prompt"
                             f"{'s' * (num_prompts != 1)}: pass one image (or one per prompt)"
                             + ("; several ControlNets take a list with one image each" if len(self.controlnets) == 1
                                else ""))
        return inputs.match_batch(pixels, num_prompts, per_prompt, name)


__all__ = ["ControlNetMixin", "ControlStep"]
