"""Fewer or cheaper UNet evaluations, opt-in on every pipeline: DeepCache (``enable_deepcache``,
mlx_stablefused.deep_cache) and ToMe token merging (``enable_token_merging``, mlx_stablefused.token_merging).

Both are run settings of one pipeline (in force during its calls only, copied by ``from_pipeline``) and both
are off by default; off, the UNet runs exactly as without them. They approximate the UNet: their speed-ups and
latent differences on the full SD 1.5 architecture are in benchmarks/benchmark_unet_speedups.py, and the
quality they keep must be judged on real weights.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any

from ..backends.base import Backend, RunSettings
from ..deep_cache import DeepCacheConfig, DeepCacheRun
from ..token_merging import TokenMergingConfig
from .denoise import Predictor


class UNetSpeedupsMixin:
    """Needs ``self.backend`` and ``self.settings`` (BaseDiffusion has both)."""

    backend: Backend
    settings: RunSettings

    def enable_deepcache(self, interval: int = 3, branch: int = 0, *, schedule: str = "uniform",
                         pow: float = 1.4, center: int = 15) -> None:
        """DeepCache: one UNet evaluation in ``interval`` runs whole and keeps the deep features at skip
        ``branch`` (0: conv_in's, the shallowest and fastest); the others run only the layers shallower than it.
        ``schedule``: "uniform" (every ``interval``-th evaluation is full) or "non_uniform" (DeepCache's
        quadratic schedule around evaluation ``center``, shaped by ``pow``). Evaluations are counted per UNet
        call of the sampler (Heun and DPM2 count both of a step); the cache starts empty every generation."""
        config = DeepCacheConfig(interval, branch, schedule, pow, center)
        config.check_branch(len(self.backend.unet_model.plan.skip_channels))
        self._refuse_with_compile("enable_deepcache")
        self.settings = replace(self.settings, deep_cache=config)

    def disable_deepcache(self) -> None:
        self.settings = replace(self.settings, deep_cache=None)

    def enable_token_merging(self, ratio: float = 0.5, *, max_downsample: int = 1, sx: int = 2, sy: int = 2,
                             use_rand: bool = True, merge_attn: bool = True, merge_crossattn: bool = False,
                             merge_mlp: bool = False, seed: int = 0) -> None:
        """ToMe for SD (tomesd's ``apply_patch`` arguments): merge ``ratio`` of the tokens of the transformer
        blocks at most ``max_downsample`` times downsampled (1: the highest resolution) before self-attention
        (and cross-attention / the MLP with ``merge_crossattn`` / ``merge_mlp``), unmerge after. Destinations:
        one per ``sy`` x ``sx`` cell, random with ``use_rand`` (numpy, from ``seed``: the same picks on every
        backend and every call)."""
        config = TokenMergingConfig(ratio, max_downsample, sx, sy, use_rand, merge_attn, merge_crossattn, merge_mlp,
                                    seed)
        self._refuse_with_compile("enable_token_merging")
        self.settings = replace(self.settings, token_merging=config)

    def disable_token_merging(self) -> None:
        self.settings = replace(self.settings, token_merging=None)

    def _refuse_with_compile(self, what: str) -> None:
        if self.settings.compile:
            raise ValueError(f"{what}: the compiled UNet step (enable_compile) has no cached or merged path; call "
                             "enable_compile(False) first")


def counted_evaluations(backend: Backend, settings: RunSettings, predict: Predictor | None,
                        evaluations: int) -> Predictor | None:
    """``predict`` (None: ``backend.unet``) with each call made UNet evaluation 0, 1, 2 ... of a new generation,
    for DeepCache's schedule (a fresh cache) and ToMe's picks; unchanged when neither is on."""
    if settings.deep_cache is None and settings.token_merging is None:
        return predict
    run = DeepCacheRun(settings.deep_cache, evaluations) if settings.deep_cache is not None else None
    inner, counter = predict or backend.unet, itertools.count()

    def evaluate(latent: Any, timestep: float, conditioning: Any) -> Any:
        with backend.evaluation(next(counter), run):
            return inner(latent, timestep, conditioning)

    return evaluate
