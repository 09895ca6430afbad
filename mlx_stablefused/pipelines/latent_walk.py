"""Latent walks: similar images around a latent, and prompt-to-prompt interpolation videos."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..backends.base import as_numpy
from ..previews import check_preview_decoder
from ..progress import progress_bar
from ..utils.array_types import like
from ..utils.interpolation import interpolation_weights, lerp, slerp
from . import inputs
from .base import BaseDiffusion, PromptType, with_run_settings
from .data_parallel import ParallelCall, Shard, embedding_window
from .denoise import Guidance, StepCallback
from .sdxl_conditioning import SDXL_PROMPT_KEYWORDS, check_sdxl_keywords, is_sdxl, sdxl_inputs

INTERPOLATIONS = {"lerp": lerp, "slerp": slerp}


def _interpolator(kind: str, what: str):
    if kind not in INTERPOLATIONS:
        raise ValueError(f"unknown {what} interpolation {kind!r}; expected one of {sorted(INTERPOLATIONS)}")
    return INTERPOLATIONS[kind]


class LatentWalkDiffusion(BaseDiffusion):
    @with_run_settings
    def __call__(self, prompt: PromptType, latent: np.ndarray, strength: float = 0.2, num_inference_steps: int = 50,
                 guidance_scale: float = 7.5, guidance_rescale: float = 0.0,
                 negative_prompt: PromptType | None = None, output_type: str = "pil",
                 return_latent_history: bool = False, seed: int | None = None,
                 noise: np.ndarray | None = None, callback_on_step_end: StepCallback | list | None = None,
                 history_decoder: str = "vae", **sdxl: Any) -> Any:
        """Images similar to the one ``latent`` (initial noise, (B, 4, h, w)) makes: the noise is moved
        ``strength`` of the way toward fresh noise, re-standardised, then fully denoised.

        A single prompt is used for every latent; otherwise one prompt per latent. SDXL models take
        text-to-image's keywords (``prompt_2``, ``negative_prompt_2``, the micro-conditioning).
        """
        arguments = {k: v for k, v in locals().items() if k != "self"}
        self._begin()
        self._check_output_type(output_type)
        check_preview_decoder(self, history_decoder)
        self.validate_steps(num_inference_steps)
        strength = inputs.fraction(strength, "strength")
        Guidance(guidance_scale, guidance_rescale)  # checked before any work
        base = as_numpy(latent)
        if base.ndim != 4:
            raise ValueError(f"latent must be (B, C, h, w), got shape {base.shape}")
        if not np.isfinite(base).all():
            raise ValueError("latent contains NaN or infinite values")
        prompts, negatives = inputs.prompt_pairs(prompt, negative_prompt)
        if len(prompts) == 1 and base.shape[0] > 1:
            prompts, negatives = prompts * base.shape[0], negatives * base.shape[0]
        if len(prompts) != base.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {base.shape[0]} latents; pass one prompt or one per latent")
        f = self.vae_scale_factor
        self.check_memory(base.shape[2] * f, base.shape[3] * f, base.shape[0])
        sdxl_call = self._sdxl_call(negative_prompt, base.shape[2] * f, base.shape[3] * f, sdxl)
        parallel = ParallelCall.begin(self, "LatentWalkDiffusion.__call__", arguments, seed)  # under a launch
        rng = inputs.make_rng(parallel.seed)
        walked = self.modify_latent(base, strength, inputs.given_or_random(noise, base.shape, rng, "noise"))
        embedding = self._embedding(prompts, negatives, negative_prompt, sdxl)

        def generate(shard: Shard, output: str) -> Any:  # the whole batch, or this rank's window of it
            part = embedding if shard.is_whole else embedding_window(self.backend, embedding, shard.window)
            latents = self.sample_from_noise(part, shard.take(walked), num_inference_steps, guidance_scale,
                                             guidance_rescale, rng, return_latent_history, callback_on_step_end,
                                             sdxl=sdxl_call, step_noise=shard.noise_source)
            return self.resolve_output(latents, output, return_latent_history, history_decoder=history_decoder)

        return parallel.map_batch(base.shape[0], generate, output_type)

    generate = __call__

    def embedding_to_latent(self, embedding: Any, num_inference_steps: int, guidance_scale: float,
                            guidance_rescale: float, latent: Any, return_latent_history: bool = False,
                            seed: int | None = None) -> list:
        """stablefused's step: denoise the full schedule from ``latent`` (initial noise, (B, C, h, w)) for
        ``embedding`` (``[uncond; cond]``; SDXL: ``(states, pooled)``, with the default micro-conditioning of
        the latent's image size); the list ``resolve_output`` takes."""
        self.validate_steps(num_inference_steps)
        latent = as_numpy(latent)
        f = self.vae_scale_factor
        sdxl_call = self._sdxl_call("", latent.shape[2] * f, latent.shape[3] * f, {})
        return self.sample_from_noise(embedding, latent, num_inference_steps, guidance_scale,
                                      guidance_rescale, inputs.make_rng(seed), return_latent_history, sdxl=sdxl_call)

    def _sdxl_call(self, negative_prompt: PromptType | None, height: int, width: int, keywords: dict) -> Any:
        """An SDXL model's checked inputs for frames of ``height`` x ``width`` (its time ids), else None (which
        refuses SDXL keywords by name)."""
        return sdxl_inputs(self, negative_prompt, height, width, text_to_image=True, **check_sdxl_keywords(keywords))

    def _embedding(self, prompts: list[str], negatives: list[str], negative_prompt: PromptType | None,
                   keywords: dict) -> Any:
        """``[uncond; cond]``; SDXL: (states, pooled), zeros for the unconditional branch when no
        ``negative_prompt`` is given and the model forces zeros (as text-to-image)."""
        if not is_sdxl(self.backend):
            return self.prompt_to_embedding(prompts, negatives)
        second = {k: keywords.get(k) for k in SDXL_PROMPT_KEYWORDS}
        return self.prompt_to_embedding(prompts, None if negative_prompt is None else negatives, **second)

    @staticmethod
    def modify_latent(latent: Any, strength: float, noise: np.ndarray | None = None,
                      seed: int | None = None) -> np.ndarray:
        """``(1 - s) * latent + s * noise``, standardised over the whole batch (as stablefused); ``noise``
        is drawn from ``seed`` when not given."""
        latent = as_numpy(latent)
        if noise is None:
            noise = inputs.random_latent(latent.shape, inputs.make_rng(seed))
        moved = (1.0 - strength) * latent + strength * noise
        return ((moved - moved.mean()) / moved.std()).astype(np.float32)

    @with_run_settings
    def interpolate(self, prompt: Sequence[str], latent: np.ndarray | None = None, image_height: int | None = None,
                    image_width: int | None = None, num_inference_steps: int = 50,
                    interpolation_steps: int | Sequence[int] = 8, guidance_scale: float = 7.5,
                    guidance_rescale: float = 0.0, negative_prompt: PromptType | None = None,
                    output_type: str = "pil", return_latent_history: bool = False,
                    embedding_interpolation_type: str = "lerp", latent_interpolation_type: str = "slerp",
                    seed: int | None = None, batch_size: int = 4, duplicate_endpoints: bool = False,
                    callback_on_step_end: StepCallback | list | None = None,
                    history_decoder: str = "vae", **sdxl: Any) -> Any:
        """A video from ``prompt[0]`` to ``prompt[-1]``: text embeddings and initial latents interpolated
        between consecutive prompts, ``interpolation_steps`` frames per pair (an int, or one per pair).
        SDXL: the pooled embeddings are interpolated as the states are; the time ids are the frames' own.

        Frames are denoised ``batch_size`` at a time (under a launch, each batch split across the ranks). Each prompt's frame appears once (the last frame
        is the last prompt's own image); ``duplicate_endpoints=True`` repeats it at every pair boundary,
        as stablefused did. ``latent``: one initial noise per prompt, (P, 4, h, w); else drawn from
        ``seed`` at ``image_height`` x ``image_width`` (default 512).
        """
        arguments = {k: v for k, v in locals().items() if k != "self"}
        self._begin()
        self._check_output_type(output_type)
        check_preview_decoder(self, history_decoder)
        self.validate_steps(num_inference_steps)
        Guidance(guidance_scale, guidance_rescale)  # checked before any work
        prompts = inputs.as_prompt_list(prompt)
        if len(prompts) < 2:
            raise ValueError("interpolate needs at least two prompts")
        prompts, negatives = inputs.prompt_pairs(prompts, negative_prompt)
        steps = self._steps_per_pair(interpolation_steps, len(prompts) - 1)
        batch_size = inputs.positive_int(batch_size, "batch_size")
        embed_fn = _interpolator(embedding_interpolation_type, "embedding")
        latent_fn = _interpolator(latent_interpolation_type, "latent")
        parallel = ParallelCall.begin(self, "LatentWalkDiffusion.interpolate", arguments, seed)  # under a launch
        rng = inputs.make_rng(parallel.seed)
        latents = self._initial_latents(latent, len(prompts), image_height, image_width, rng)
        f = self.vae_scale_factor
        sdxl_call = self._sdxl_call(negative_prompt, latents.shape[2] * f, latents.shape[3] * f, sdxl)
        embedding = self._embedding(prompts, negatives, negative_prompt, sdxl)
        parts = [self.backend.to_numpy(e) for e in (embedding if isinstance(embedding, tuple) else (embedding,))]
        frame_parts: list[list[np.ndarray]] = [[] for _ in parts]  # per part: [uncond frames, cond frames] pairs
        frame_latents = []
        for i, k in enumerate(steps):
            last_pair = i == len(steps) - 1
            w = interpolation_weights(k, include_end=duplicate_endpoints)
            for part, frames in zip(parts, frame_parts):
                uncond, cond = part[: len(prompts)], part[len(prompts):]
                frames.append((embed_fn(uncond[i], uncond[i + 1], w), embed_fn(cond[i], cond[i + 1], w)))
                if last_pair and not duplicate_endpoints:
                    frames.append((uncond[-1:], cond[-1:]))
            frame_latents.append(latent_fn(latents[i], latents[i + 1], w))
            if last_pair and not duplicate_endpoints:
                frame_latents.append(latents[-1:])
        frames = [(np.concatenate([u for u, _ in part]), np.concatenate([c for _, c in part]))
                  for part in frame_parts]
        lat_all = np.concatenate(frame_latents).astype(np.float32)
        return self._render_frames(frames, lat_all, num_inference_steps, guidance_scale, guidance_rescale,
                                   output_type, return_latent_history, batch_size, rng, callback_on_step_end,
                                   history_decoder, parallel, sdxl_call)

    def interpolate_embedding(self, embedding: Any, interpolation_steps: int | Sequence[int],
                              interpolation_type: str = "lerp") -> Any:
        """stablefused's building block: ``[uncond; cond]`` embeddings of P prompts -> ``[uncond; cond]`` of
        the frames between consecutive prompts, ``interpolation_steps`` per pair with both ends included (as
        stablefused; ``interpolate`` itself does not repeat the ends). The negatives are interpolated too
        (stablefused repeated the first). Returned in the type given."""
        fn = _interpolator(interpolation_type, "embedding")
        e = as_numpy(embedding)
        p = e.shape[0] // 2
        uncond = self._pairwise(fn, e[:p], interpolation_steps)
        cond = self._pairwise(fn, e[p:], interpolation_steps)
        return like(np.concatenate([uncond, cond]), embedding)

    def interpolate_latent(self, latent: Any, interpolation_steps: int | Sequence[int],
                           interpolation_type: str = "slerp") -> Any:
        """stablefused's building block: P latents (P, C, h, w) -> the frames between consecutive ones,
        ``interpolation_steps`` per pair, both ends included; returned in the type given."""
        fn = _interpolator(interpolation_type, "latent")
        return like(self._pairwise(fn, as_numpy(latent), interpolation_steps).astype(np.float32), latent)

    def _pairwise(self, fn, values: np.ndarray, interpolation_steps: int | Sequence[int]) -> np.ndarray:
        if len(values) < 2:
            raise ValueError(f"interpolation needs at least two entries, got {len(values)}")
        steps = self._steps_per_pair(interpolation_steps, len(values) - 1)
        return np.concatenate([fn(values[i], values[i + 1], interpolation_weights(k, include_end=True))
                               for i, k in enumerate(steps)])

    @staticmethod
    def _steps_per_pair(interpolation_steps: int | Sequence[int], pairs: int) -> list[int]:
        if isinstance(interpolation_steps, (int, np.integer)) and not isinstance(interpolation_steps, bool):
            steps = [int(interpolation_steps)] * pairs
        elif isinstance(interpolation_steps, (list, tuple)):
            if len(interpolation_steps) != pairs:
                raise ValueError(f"interpolation_steps has {len(interpolation_steps)} entries for {pairs} prompt "
                                 "pairs; give one per consecutive pair")
            steps = [int(s) for s in interpolation_steps]
        else:
            raise TypeError(f"interpolation_steps must be an int or a list of ints, got {interpolation_steps!r}")
        if min(steps) < 1:
            raise ValueError(f"interpolation_steps must be >= 1, got {interpolation_steps}")
        return steps

    def _initial_latents(self, latent: np.ndarray | None, count: int, height: int | None, width: int | None,
                         rng: np.random.Generator) -> np.ndarray:
        if latent is not None:
            out = as_numpy(latent)
            if out.ndim != 4 or out.shape[0] != count:
                raise ValueError(f"latent must be ({count}, C, h, w), one per prompt; got shape {out.shape}")
            self.check_memory(out.shape[2] * self.vae_scale_factor, out.shape[3] * self.vae_scale_factor, 1)
            return out
        height, width = height or 512, width or 512
        self.validate_size(height, width)
        self.check_memory(height, width, 1)
        f = self.vae_scale_factor
        return inputs.random_latent((count, self.latent_channels, height // f, width // f), rng)

    def _render_frames(self, frames: list[tuple[np.ndarray, np.ndarray]], latents: np.ndarray,
                       num_inference_steps: int, guidance_scale: float, guidance_rescale: float, output_type: str,
                       return_latent_history: bool, batch_size: int, rng: np.random.Generator,
                       callback_on_step_end: StepCallback | list | None = None,
                       history_decoder: str = "vae", parallel: ParallelCall | None = None,
                       sdxl: Any = None) -> Any:
        """Denoise the frames ``batch_size`` at a time; ``frames``: (uncond, cond) per embedding part (the
        text states; SDXL: and the pooled embeddings)."""
        outputs = []
        parallel = parallel or ParallelCall(self, None, None, None)
        native = output_type in (self.backend.native_output_type, "pt")  # arrays: merged as numpy first
        with progress_bar(len(latents), "frames", self.progress, unit="frame") as bar:
            for s in range(0, len(latents), batch_size):
                if self._interrupted:
                    break
                e = slice(s, s + batch_size)

                def generate(shard: Shard, output: str) -> Any:  # the batch, or this rank's window of it
                    parts = tuple(self.backend.from_numpy(np.concatenate([shard.take(u[e]), shard.take(c[e])]))
                                  for u, c in frames)
                    result = self.sample_from_noise(parts if len(parts) > 1 else parts[0], shard.take(latents[e]),
                                                    num_inference_steps, guidance_scale, guidance_rescale, rng,
                                                    return_latent_history, callback_on_step_end, sdxl=sdxl,
                                                    step_noise=shard.noise_source)
                    return self.resolve_output(result, output, return_latent_history, history_decoder=history_decoder)

                outputs.append(parallel.map_batch(len(latents[e]), generate, "np" if native else output_type))
                bar.update(len(latents[e]))
        if output_type == "pil":
            return [frame for batch in outputs for frame in batch]
        merged = np.concatenate(outputs, axis=0)
        return self.vae_io.format(merged, output_type) if native else merged
