"""What a pipeline splits across the ranks of a launch (see ``mlx_stablefused.distributed``).

Data parallel: a batch of independent items (images of prompts x num_images_per_prompt, interpolation
frames, walk latents, the values of a guidance sweep) is cut into one contiguous window per rank; each
rank denoises and decodes its window, and an all_gather gives every rank the whole result. The result
equals one process's: the noise is drawn for the whole batch from the one seeded numpy generator on
every rank, and each rank takes its window of it (the initial latents, and every step's noise of the
ancestral and SDE samplers through ``ShardStepNoise``), so the ranks consume the generator exactly as one
process would. Windows have equal sizes (a rank with fewer items recomputes its neighbour's last ones
and drops them), so the generator, the exchange and the time per rank stay in step.

Guidance parallel: the unconditional and conditional halves of every guided UNet call on two ranks,
exchanging the noise prediction each step. Context windows: the windows of each AnimateDiff step
spread over the ranks and blended in the one process's order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..backends.base import Array
from ..conditioning import Conditioning
from ..distributed import Group, agreed_seed, check_same_run, current_group, launcher
from ..schedulers.brownian import SEED_BOUND, BrownianNoise, BrownianTree, StepNoise


@dataclass(frozen=True)
class Shard:
    """Rank ``rank``'s part of ``total`` items: it computes ``window`` (``per_rank`` items, the same count on
    every rank) and owns the items ``own`` of it (fewer, or none, where the batch does not divide)."""

    total: int
    rank: int = 0
    size: int = 1

    @property
    def is_whole(self) -> bool:
        """One process: the window is the whole batch, taken as it is."""
        return self.size == 1

    def take(self, batch: Any) -> Any:
        """This window of a batch (an array or a ``Conditioning``); the batch itself on one process."""
        return batch if self.is_whole or batch is None else batch[self.window]

    @property
    def noise_source(self) -> Callable | None:
        """``denoise``'s ``step_noise`` for this window (None on one process: the plain ``StepNoise``)."""
        return None if self.is_whole else self.step_noise

    @property
    def per_rank(self) -> int:
        return math.ceil(self.total / self.size)

    @property
    def own(self) -> range:
        c = self.per_rank
        return range(min(self.rank * c, self.total), min((self.rank + 1) * c, self.total))

    @property
    def window(self) -> slice:
        start = min(self.rank * self.per_rank, self.total - self.per_rank)
        return slice(start, start + self.per_rank)

    def merge(self, gathered: np.ndarray) -> np.ndarray:
        """(size, per_rank, ...) from all ranks -> (total, ...) in item order, each item from its owner."""
        parts = []
        for r in range(self.size):
            other = Shard(self.total, r, self.size)
            offset = other.own.start - other.window.start
            parts.append(gathered[r, offset:offset + len(other.own)])
        return np.concatenate(parts)

    def step_noise(self, shape: tuple[int, ...], rng: np.random.Generator,
                   to_native: Callable[[np.ndarray], Any] = lambda a: a) -> StepNoise:
        """``denoise``'s noise source for this window: the whole batch's draws, this window's rows."""
        return ShardStepNoise(shape, rng, to_native, self)


class ShardStepNoise(StepNoise):
    """A ``StepNoise`` that draws for the whole batch and gives the shard's window of it."""

    def __init__(self, shape: tuple[int, ...], rng: np.random.Generator, to_native: Callable[[np.ndarray], Any],
                 shard: Shard) -> None:
        super().__init__((shard.total, *shape[1:]), rng, to_native)
        self.shard = shard

    def __call__(self) -> Any:
        return self.to_native(self.rng.standard_normal(self.shape).astype(np.float32)[self.shard.window])

    def brownian(self, t0: float, t1: float) -> BrownianNoise:
        seed = int(self.rng.integers(0, SEED_BOUND))
        window, to_native = self.shard.window, self.to_native
        return BrownianNoise(BrownianTree(t0, t1, self.shape, seed), lambda a: to_native(a[window]))


# ------------------------------------------------------------------------------------------- a call
class ParallelCall:
    """One public generation call on the group (or on one process): how it is split, and its exchanges."""

    def __init__(self, pipe: Any, group: Group | None, mode: str | None, seed: Any) -> None:
        self.pipe, self.group, self.mode, self.seed = pipe, group, mode, seed

    @classmethod
    def begin(cls, pipe: Any, call: str, arguments: dict[str, Any], seed: Any = None) -> "ParallelCall":
        """Find the group (unless ``pipe.distributed`` is False), check that every rank runs the same model
        and call, and agree on the seed. ``mode``: "data", "guidance" (``pipe.guidance_parallel``, which
        needs exactly two ranks) or None (one process)."""
        group = current_group() if getattr(pipe, "distributed", True) and launcher() else None
        if group is None:  # one process: everything runs here, guidance_parallel included
            pipe._parallel_call = cls(pipe, None, None, seed)
            return pipe._parallel_call
        mode = "guidance" if getattr(pipe, "guidance_parallel", False) else "data"
        if mode == "guidance" and group.size != 2:
            raise ValueError(f"guidance_parallel=True splits each guided step over exactly 2 ranks; this launch has "
                             f"{group.size}")
        check_same_run(group, pipe.backend, (pipe.backend.name, str(pipe.backend.dtype), pipe.scheduler_name,
                                             pipe.scheduler_overrides, pipe.settings, mode), call, arguments)
        pipe._parallel_call = cls(pipe, group, mode, agreed_seed(group, seed))
        return pipe._parallel_call

    @property
    def splits_data(self) -> bool:
        return self.mode == "data"

    def shard(self, total: int) -> Shard:
        return Shard(total, self.group.rank, self.group.size) if self.splits_data else Shard(total)

    def map_batch(self, total: int, run: Callable[[Shard, str], Any], output_type: str) -> Any:
        """``run(shard, output_type)`` on this rank's window of ``total`` items; on a group, run with "np"
        (or "latent"), gathered, and formatted as ``output_type`` on every rank."""
        if not self.splits_data:
            return run(Shard(total), output_type)
        shard = self.shard(total)
        local_type = "latent" if output_type == "latent" else "np"
        local = np.asarray(run(shard, local_type))
        self.agree_on_interrupt()
        merged = shard.merge(self.group.all_gather(local, "gathering the batch"))
        return merged if output_type == "latent" else self.pipe.vae_io.format(merged, output_type)

    def agree_on_interrupt(self) -> None:
        """An ``interrupt()`` on any rank stops every rank's call (each has returned its current latents)."""
        flags = self.group.all_gather(np.array([self.pipe.interrupted], np.int32), "sharing interrupt()")
        if flags.any():
            self.pipe._interrupted = True

    def each(self, count: int, compute: Callable[[int], Array]) -> Any:
        """``compute(k)`` for k in range(count), in order: lazily on one process; on a group each rank
        computes its window of the k and every rank gets all results (context windows of a step)."""
        if not self.splits_data:
            return (compute(k) for k in range(count))
        backend, shard = self.pipe.backend, self.shard(count)
        local = np.stack([backend.to_numpy(compute(k)) for k in range(count)[shard.window]])
        merged = shard.merge(self.group.all_gather(local, "exchanging the context windows"))
        return [backend.from_numpy(m) for m in merged]

    def predictor(self, base: Callable | None, guided: bool) -> Callable | None:
        """The UNet call of a guidance-parallel step: this rank's half of the [uncond; cond] batch, the other
        half exchanged. None (the plain call) unless guidance parallel applies."""
        if self.mode != "guidance" or not guided:
            return base
        backend, group = self.pipe.backend, self.group
        unet = base or backend.unet

        def predict(x: Array, timestep: float, conditioning: Conditioning) -> Array:
            half = x.shape[0] // 2
            mine = slice(group.rank * half, (group.rank + 1) * half)
            part = unet(x[mine], timestep, conditioning[mine])
            both = group.all_gather(backend.to_numpy(part), "exchanging the guidance halves")
            return backend.from_numpy(np.concatenate(list(both)))

        return predict


def embedding_window(backend: Any, embedding: Array, window: slice) -> Array:
    """The ``[uncond; cond]`` embedding of a window of the batch (SDXL's ``(states, pooled)``: each)."""
    if isinstance(embedding, tuple):
        return tuple(embedding_window(backend, part, window) for part in embedding)
    b = embedding.shape[0] // 2
    return backend.concat([embedding[:b][window], embedding[b:][window]])


def guidance_sweep(pipe: Any, guidance_scales: list[float], seed: int | None = None, **call: Any) -> list[Any]:
    """``pipe(guidance_scale=s, seed=seed, **call)`` for every ``s`` (the same noise for each), the values
    split across the ranks of a launch; every rank returns the results of all, in order (each as the
    pipeline returns it for ``output_type``)."""
    scales = [float(s) for s in guidance_scales]
    if not scales:
        raise ValueError("guidance_scales must list at least one value")
    if "guidance_scale" in call:
        raise ValueError("pass the values as guidance_scales, not guidance_scale")
    output_type = call.pop("output_type", "pil")
    parallel = ParallelCall.begin(pipe, f"guidance_sweep({type(pipe).__name__})",
                                  dict(call, guidance_scales=scales, seed=seed, output_type=output_type), seed)
    seed = parallel.seed

    def run(shard: Shard, out_type: str) -> Any:
        results, distributed = [], getattr(pipe, "distributed", True)
        pipe.distributed = False  # each value is one ordinary call on this rank
        try:
            for s in scales[shard.window]:
                results.append(pipe(guidance_scale=s, seed=seed, output_type=out_type, **call))
        finally:
            pipe.distributed = distributed
        return results

    if not parallel.splits_data:
        return run(Shard(len(scales)), output_type)
    shard = parallel.shard(len(scales))
    local_type = "latent" if output_type == "latent" else "np"
    local = np.stack([np.asarray(r) for r in run(shard, local_type)])
    parallel.agree_on_interrupt()
    merged = shard.merge(parallel.group.all_gather(local, "gathering the sweep"))
    return [m if output_type == "latent" else pipe.vae_io.format(m, output_type) for m in merged]


__all__ = ["Shard", "ShardStepNoise", "ParallelCall", "embedding_window", "guidance_sweep"]
