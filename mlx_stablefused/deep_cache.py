"""DeepCache (Ma, Fang & Wang 2023, arXiv 2312.00858; github.com/horseee/DeepCache): reuse the UNet's deep
features across denoising evaluations.

Adjacent evaluations change the UNet's deep (low-resolution) features little. On a *full* evaluation the UNet
runs whole and keeps the features entering the up path at one skip branch; on a *cached* evaluation only the
shallow part runs: conv_in and the down layers up to that branch, then the up layers that take those skips,
starting from the kept features (the mid block and everything deeper is skipped).

``branch`` numbers the UNet's skip connections in the order the down path makes them: 0 is conv_in's (the
shallowest: a cached evaluation runs conv_in and the last up layer only), then one per down layer and one per
downsampler (``UNetPlan.skip_channels``). It is the repository's ``cache_branch_id``
(``DeepCacheSDHelper.set_params``: with SD's three skips per down block, ``cache_block_id = branch // 3`` and
``cache_layer_id = branch % 3``). Which evaluations are full: the repository's uniform schedule, every
``interval``-th from the first (``i % interval == 0``), or its non-uniform one (``sample_from_quad_center``:
full evaluations spaced quadratically around ``center``, denser there).

Decisions of this port (the paper's pipeline calls the UNet once per step):
* The schedule counts UNet evaluations of one generation, the sampler's timestep-table index from the first
  evaluation: Heun and DPM2, which evaluate twice per step, count each evaluation (their table interleaves
  them), so ``interval`` means the same saving on every sampler.
* The features are kept per UNet module call in call order within an evaluation: the guidance batch
  ``[uncond; cond]`` is cached jointly when it runs as one batch (torch; MLX without CPU streams) and per half
  when MLX runs the halves on two CPU streams, each context window of a long video separately. Both halves
  always follow the same schedule; per-sample results are the same either way.
* Every generation (each ``run_denoise``) starts with an empty cache; the first evaluation is always full.
This module imports no framework.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .validation import finite_float, non_negative_int, positive_int

SCHEDULES = ("uniform", "non_uniform")


@dataclass(frozen=True)
class DeepCacheConfig:
    """What ``enable_deepcache`` sets: ``interval`` (N of the paper's 1:N: one full evaluation in N; 1 runs
    every evaluation whole, exactly the plain path), ``branch`` (the skip branch, see the module docstring) and
    the schedule (``"uniform"``, or ``"non_uniform"`` with the repository's ``pow`` and ``center``)."""

    interval: int = 3
    branch: int = 0
    schedule: str = "uniform"
    pow: float = 1.4
    center: int = 15

    def __post_init__(self) -> None:
        object.__setattr__(self, "interval", positive_int(self.interval, "interval"))
        object.__setattr__(self, "branch", non_negative_int(self.branch, "branch"))
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if finite_float(self.pow, "pow") <= 1.0:
            raise ValueError(f"pow must be greater than 1, got {self.pow}")
        object.__setattr__(self, "center", non_negative_int(self.center, "center"))

    def check_branch(self, skip_count: int) -> None:
        """Refuse a branch this UNet does not have (it makes ``skip_count`` skips), before any work."""
        if self.branch >= skip_count:
            raise ValueError(f"enable_deepcache: branch={self.branch}, but this UNet has {skip_count} skip "
                             f"branches (0 to {skip_count - 1})")

    def full_evaluations(self, count: int) -> frozenset[int]:
        """Indices (0-based, of ``count`` evaluations) that run the whole UNet; the first is always one."""
        if self.interval == 1 or count <= 1:
            return frozenset(range(count))
        if self.schedule == "uniform":
            return frozenset(range(0, count, self.interval))
        return frozenset(quadratic_around_center(count, -(-count // self.interval), self.center, self.pow))


def quadratic_around_center(total: int, wanted: int, center: int, pow: float) -> list[int]:
    """DeepCache's non-uniform 1:N schedule (its ``sample_from_quad_center``, same arithmetic): ``wanted``
    indices in [0, total), 0 first, the others ``center + int(Re(u ** pow))`` for ``u`` evenly spaced from
    ``(-center) ** (1 / pow)`` (the complex principal root, as Python computes it there) to
    ``(total - center) ** (1 / pow)``, the smallest and largest distinct values dropped, so the full evaluations
    crowd around ``center``; ``pow`` is lowered by 0.02 until exactly ``wanted`` indices come out."""
    p = pow
    while p > 1.0:
        u = np.linspace(complex(-center) ** (1 / p), complex(total - center) ** (1 / p), wanted + 1)
        offsets = np.unique(np.trunc((u ** p).real).astype(np.int64))[1:-1]
        indices = [0] + [int(center + o) for o in offsets]
        if len(indices) == wanted:
            return indices
        p -= 0.02
    raise ValueError(f"DeepCache's non-uniform schedule finds no {wanted} full evaluations out of {total} around "
                     f"center={center}; lower the interval or the center, or use schedule='uniform'")


@dataclass
class FeatureSlot:
    """One UNet module call's part in DeepCache, handed to the UNet as ``deep_cache=``. ``feature`` is None on a
    full call (the UNet runs whole and gives the features entering the up path at ``branch`` to ``keep``), or
    the kept features on a cached call (the UNet runs only the layers shallower than ``branch``)."""

    branch: int
    feature: Any = None
    _kept: list = field(default_factory=list, repr=False)

    @property
    def reuses(self) -> bool:
        return self.feature is not None

    def keep(self, feature: Any) -> None:
        self._kept.append(feature)


class DeepCacheRun:
    """One generation's DeepCache: which evaluations are full, and the features each module call of the last
    full evaluation kept (by call order, with the input shape they were made for)."""

    def __init__(self, config: DeepCacheConfig, evaluations: int) -> None:
        self.config = config
        self.full = config.full_evaluations(evaluations)
        self._kept: dict[int, tuple[tuple[int, ...], list]] = {}
        self._reusing = False
        self._call = 0
        self.full_calls = self.cached_calls = 0  # module calls of each kind so far (what the run saved)

    def begin_evaluation(self, index: int) -> None:
        self._reusing = index not in self.full
        self._call = 0

    def slot(self, input_shape: tuple[int, ...]) -> FeatureSlot:
        """The next module call's slot: reuse what the same call of the last full evaluation kept, if it was
        made for this input shape; otherwise run whole and keep (a fresh cache, or a batch that changed)."""
        call, self._call = self._call, self._call + 1
        kept = self._kept.get(call)
        if self._reusing and kept is not None and kept[0] == tuple(input_shape) and kept[1]:
            self.cached_calls += 1
            return FeatureSlot(self.config.branch, feature=kept[1][-1])
        self.full_calls += 1
        slot = FeatureSlot(self.config.branch)
        self._kept[call] = (tuple(input_shape), slot._kept)
        return slot
