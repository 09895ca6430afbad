"""The sampling core: one generator that runs a sampler over the UNet and yields after every step.

Every pipeline (images, walks, inpainting, video) denoises through ``denoise``. It knows
nothing of prompts, images or outputs: it takes a latent, the ``Conditioning`` of each
guidance branch and a ``Guidance``, and yields a mutable ``StepState``; whoever iterates may
replace ``state.latents`` before asking for the next step (callbacks, history, previews and
cancellation are built on that, see ``StepCallbacks``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..backends.base import Array, Backend
from ..conditioning import Conditioning
from ..errors import NonFiniteError
from ..schedulers import Scheduler
from ..schedulers.brownian import StepNoise
from .inputs import finite_float

Predictor = Callable[[Array, float, Conditioning], Array]
# (step from the start, steps from the start to the schedule's end, UNet input, timestep, its conditioning) ->
# the conditioning for this step (a ControlNet adds its residuals; see pipelines/controlnet.py).
StepConditioning = Callable[[int, int, Array, float, Conditioning], Conditioning]
StepCallback = Callable[[Any, int, float, dict], "dict | None"]


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance: ``uncond + scale * (cond - uncond)``, optionally rescaled toward cond's
    standard deviation (arXiv 2305.08891). At exactly 1.0 the unconditional pass cannot change the
    result and is skipped."""

    scale: float = 7.5
    rescale: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", finite_float(self.scale, "guidance_scale"))
        object.__setattr__(self, "rescale", finite_float(self.rescale, "guidance_rescale"))

    @property
    def enabled(self) -> bool:
        return self.scale != 1.0

    def combine(self, backend: Backend, prediction: Array) -> Array:
        """The guided prediction from the UNet's ``[uncond; cond]`` batch."""
        b = prediction.shape[0] // 2
        uncond, cond = prediction[:b], prediction[b:]
        guided = uncond + (cond - uncond) * self.scale
        if self.rescale > 0:
            std = backend.per_sample_std
            rescaled = guided * (std(cond) / std(guided))
            guided = rescaled * self.rescale + guided * (1.0 - self.rescale)
        return guided


@dataclass
class StepState:
    """One finished step: ``index`` into the sampler's table, its ``timestep``, the new ``latents`` (native,
    may be replaced by the consumer) and the guided ``noise_pred`` that produced them."""

    index: int
    timestep: float
    latents: Array
    noise_pred: Array


def denoise(backend: Backend, scheduler: Scheduler, latents: Array, conditioning: Conditioning,
            negative: Conditioning | None, guidance: Guidance, rng: np.random.Generator, start: int = 0,
            predict: Predictor | None = None,
            after_step: Callable[[int, Array], Array] | None = None, stop: int | None = None,
            step_conditioning: StepConditioning | None = None,
            step_noise: Callable[..., StepNoise] | None = None) -> Iterator[StepState]:
    """Run ``scheduler`` (timesteps already set) from table index ``start`` to ``stop`` (default: the end;
    SDXL's ``denoising_end`` stops early); yield after every step.

    ``negative`` is the unconditional branch (needed unless guidance is off). ``predict`` replaces
    ``backend.unet`` (context windows over frames); ``after_step(i, latents)`` is part of the
    algorithm (latent-blending inpainting re-imposes the known region) and runs before the yield.
    ``step_conditioning`` builds each step's conditioning before the UNet runs (a ControlNet's residuals).
    Ancestral and SDE samplers draw their noise from ``rng`` in diffusers' layout; ``step_noise`` replaces
    ``StepNoise`` as the source (a rank's window of a batch split across processes: ``data_parallel``).
    """
    predict = predict or backend.unet
    if guidance.enabled:
        if negative is None:
            raise ValueError("classifier-free guidance needs the negative (unconditional) conditioning")
        batched = Conditioning.concat([negative, conditioning], backend.concat)
    else:
        batched = conditioning
    noise = (step_noise or StepNoise)(backend.latent_shape(latents), rng, backend.latent_from_numpy)

    end = len(scheduler.timesteps) if stop is None else stop
    for i in range(start, end):
        t = float(scheduler.timesteps[i])
        x = scheduler.scale_model_input(latents, i)
        x = backend.concat([x, x]) if guidance.enabled else x
        step = batched if step_conditioning is None else step_conditioning(
            i - start, len(scheduler.timesteps) - start, x, t, batched)
        prediction = predict(x, t, step)
        if guidance.enabled:
            prediction = guidance.combine(backend, prediction)
        latents = scheduler.step(prediction, i, latents, noise)
        if after_step is not None:
            latents = after_step(i, latents)
        backend.evaluate(latents)
        if not backend.all_finite(latents):
            raise NonFiniteError(non_finite_message("the latents", i - start + 1, end - start,
                                                    t, backend))
        state = StepState(i, t, latents, prediction)
        yield state
        latents = state.latents


class StepCallbacks:
    """diffusers' ``callback_on_step_end(pipe, step, timestep, callback_kwargs)``: each callback gets the
    step's tensors as a dict (``latents``, ``noise_pred``) and may return a dict whose ``latents`` replace
    the current ones; ``pipe.interrupt()`` (from a callback or another thread) stops after the step."""

    def __init__(self, pipe: Any, callbacks: StepCallback | Sequence[StepCallback] | None) -> None:
        if callbacks is None:
            callbacks = []
        elif callable(callbacks):
            callbacks = [callbacks]
        elif not all(callable(c) for c in callbacks):
            raise TypeError("callback_on_step_end must be a callable or a list of callables")
        for callback in callbacks:  # a callback that needs something of the pipeline says so before the first step
            check = getattr(callback, "check_pipeline", None)
            if callable(check):
                check(pipe)
        self.pipe, self.callbacks = pipe, list(callbacks)

    def __call__(self, state: StepState) -> None:
        backend = self.pipe.backend
        for callback in self.callbacks:
            # Native arrays in diffusers' layout, as every latent that crosses the public API.
            latents = backend.latent_to_public(state.latents)
            tensors = {"latents": latents, "noise_pred": backend.latent_to_public(state.noise_pred)}
            out = callback(self.pipe, state.index, state.timestep, tensors)
            if out is None:
                continue
            if not isinstance(out, dict):
                raise TypeError(f"callback_on_step_end must return a dict or None, got {type(out).__name__}")
            if "latents" in out:
                new = out["latents"]
                if tuple(getattr(new, "shape", ())) != tuple(latents.shape):
                    raise ValueError(f"callback_on_step_end returned latents of shape {getattr(new, 'shape', None)}; "
                                     f"expected {tuple(latents.shape)} (diffusers' layout, as the callback got them)")
                state.latents = backend.latent_from_public(new)


def non_finite_message(what: str, step: int | None, steps: int | None, timestep: float | None,
                       backend: Backend) -> str:
    """Where values turned NaN/inf and the likely cause, for the error that stops the run."""
    where = f" at step {step} of {steps} (timestep {timestep:g})" if step is not None else ""
    dtype = str(getattr(backend, "dtype", "")).rsplit(".", 1)[-1]
    cause = ("in float16 this is usually an overflow: load the model with dtype='bfloat16' or 'float32'"
             if dtype == "float16" else "check the inputs (latents, guidance, images) and the model's weights")
    return f"{what} became NaN or infinite{where}; {cause}. Nothing was written."

