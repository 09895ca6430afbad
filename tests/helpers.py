"""What the test files share: the backend list, parity measurement, diffusers' sampler classes, test data,
and the session cache of loaded tiny models. A plain module (tests import it; conftest only wires fixtures)."""

from __future__ import annotations

import copy
import gzip
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

TESTS_DIR = Path(__file__).resolve().parent
BUNDLED_TOKENIZER = TESTS_DIR.parent / "mlx_stablefused" / "data" / "clip-tokenizer"  # the real CLIP vocabulary,
# gzipped: shipped with the package for single-file checkpoints (mlx_stablefused.single_file)

BACKENDS = ("mlx", "torch")  # every backend; tests parametrize over this tuple (conftest's backend_name)


# ------------------------------------------------------------------------------------- measurement
def rel_error(ours: np.ndarray, ref: np.ndarray) -> float:
    """||ours - ref|| / ||ref|| in float64; shapes must agree."""
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-12))


def max_abs_error(ours: Any, ref: Any) -> float:
    """Largest absolute difference (images in [0, 1]); shapes must agree."""
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max())


PARITY: dict[str, float] = {}  # check name -> worst measured error this session (conftest prints it)


def report(name: str, value: float) -> float:
    """Record a measured parity error under ``name`` and return it (to assert on)."""
    PARITY[name] = max(PARITY.get(name, 0.0), float(value))
    return float(value)


# ------------------------------------------------------------------------------ diffusers' samplers
KARRAS = {"use_karras_sigmas": True}
DIFFUSERS_SCHEDULERS: dict[str, tuple[str, dict]] = {  # our sampler name -> diffusers class, preset options
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm2_ancestral": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpm2_karras": ("KDPM2DiscreteScheduler", KARRAS),
    "dpm2_karras_ancestral": ("KDPM2AncestralDiscreteScheduler", KARRAS),
    "dpm_sde": ("DPMSolverSDEScheduler", {}),
    "dpm_sde_karras": ("DPMSolverSDEScheduler", KARRAS),
    "dpm_multistep": ("DPMSolverMultistepScheduler", {}),
    "dpm_multistep_karras": ("DPMSolverMultistepScheduler", KARRAS),
    "dpm_singlestep": ("DPMSolverSinglestepScheduler", {}),
    "dpm_singlestep_karras": ("DPMSolverSinglestepScheduler", KARRAS),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "linear_multistep": ("LMSDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
_BUILT_SCHEDULERS: dict[tuple[str, str], Any] = {}


def diffusers_scheduler(name: str, config: dict, **overrides: Any) -> Any:
    """A fresh diffusers scheduler for our sampler ``name``, configured as ``from_config(config, preset,
    overrides)``. Constructions are cached and deep-copied: KDPM2's constructor alone maps 1000 sigmas
    to timesteps one by one (0.3 s), which dominated the sampler tests."""
    import diffusers

    cls_name, preset = DIFFUSERS_SCHEDULERS[name]
    merged = {**config, **preset, **overrides}
    key = (cls_name, json.dumps(merged, sort_keys=True, default=str))
    if key not in _BUILT_SCHEDULERS:
        _BUILT_SCHEDULERS[key] = getattr(diffusers, cls_name).from_config(merged)
    return copy.deepcopy(_BUILT_SCHEDULERS[key])


def diffusers_scheduler_for(root: Path, name: str) -> Any:
    """diffusers' scheduler for sampler ``name``, configured from the model folder's scheduler config."""
    import diffusers

    return diffusers_scheduler(name, dict(diffusers.DDIMScheduler.load_config(str(root), subfolder="scheduler")))


def diffusers_pipeline(pipe: Any, pipeline_class: str | None = None, scheduler: Any = None) -> Any:
    """A new diffusers pipeline object on ``pipe``'s modules (no copy), optionally of another class and with
    its own scheduler: the session's shared pipelines are never modified."""
    import diffusers

    cls = type(pipe) if pipeline_class is None else getattr(diffusers, pipeline_class)
    components = dict(pipe.components)
    if scheduler is not None:
        components["scheduler"] = scheduler
    expected, optional = cls._get_signature_keys(cls)
    extra = {"requires_safety_checker": False} if "requires_safety_checker" in optional else {}
    out = cls(**{k: v for k, v in components.items() if k in set(expected)}, **extra)
    out.set_progress_bar_config(disable=True)
    return out


class NetworkRunner:
    """Runs a loaded pipeline's networks (``backend.text_encoder``, ``.vae``, ``.unet_model``: diffusers'
    module names) with numpy in and out, in diffusers' NCHW layout (MLX's networks work in NHWC)."""

    def __init__(self, backend: Any) -> None:
        self.backend, self.mlx = backend, backend.name == "mlx"

    def _in(self, x: np.ndarray, image: bool = True) -> Any:
        if self.mlx:
            import mlx.core as mx

            return mx.array(np.ascontiguousarray(x.transpose(0, 2, 3, 1))) if image else mx.array(x)
        import torch

        return torch.from_numpy(np.ascontiguousarray(x))

    def _out(self, y: Any, image: bool = True) -> np.ndarray:
        if self.mlx:
            return np.asarray(y).transpose(0, 3, 1, 2) if image else np.asarray(y)
        return y.detach().cpu().numpy()

    def text(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Token ids (B, 77) -> (last hidden state, pooled output)."""
        import torch

        with torch.no_grad():
            out = self.backend.text_encoder(self._in(ids, image=False))
        return self._out(out.last_hidden_state, False), self._out(out.pooler_output, False)

    def decode(self, z: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self._out(self.backend.vae.decode(self._in(z)))

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images (B, 3, H, W) in [-1, 1] -> posterior (mean, logvar)."""
        import torch

        with torch.no_grad():
            mean, logvar = self.backend.vae.encode(self._in(x))
        return self._out(mean), self._out(logvar)

    def unet(self, x: np.ndarray, t: float, ctx: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            if self.mlx:
                import mlx.core as mx

                t_in = mx.array(t)
            else:
                t_in = torch.tensor(t)
            return self._out(self.backend.unet_model(self._in(x), t_in, self._in(ctx, image=False)))


# ------------------------------------------------------------------------------------------ data
def unpack_clip_vocabulary(target: Path) -> Path:
    """The real CLIP vocabulary (vocab.json, merges.txt) unpacked from the package data into ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        with gzip.open(BUNDLED_TOKENIZER / f"{name}.gz", "rb") as src:
            data = src.read()
        tmp = target / f".{name}.{os.getpid()}"
        tmp.write_bytes(data)
        os.replace(tmp, target / name)
    return target


def convert_with_cli(source: Path, target: Path, dtype: str = "float32") -> Path:
    """Convert a model folder to the MLX format through the public command line; the converted folder."""
    from mlx_stablefused.cli import main

    code = main(["convert", str(source), str(target), "--dtype", dtype])
    assert code == 0, f"mlx-stablefused convert exited with {code}"
    return target


# ----------------------------------------------------------------------------- loaded tiny models
def _torch_default_device() -> str:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return "cuda" if torch.cuda.is_available() else "mps" if mps is not None and mps.is_available() else "cpu"


class PipelineCache:
    """Our pipelines on the tiny models, loaded (and converted) once per session for every test file.

    ``pipeline(cls, root, backend=...)`` returns a *new* pipeline object on the cached components, so its
    sampler and pipeline settings are the test's own; the networks are shared. A test that changes
    backend-wide state (compile, quantize, CPU streams, attention chunks, motion norm) either restores it
    or loads a private model with the pipeline class itself.
    """

    def __init__(self) -> None:
        self._components: dict[tuple, Any] = {}

    def components(self, cls: type, root: Path, backend: str = "mlx", **load_options: Any) -> Any:
        """The cached ``ModelComponents`` for ``root`` on ``backend`` (loaded by ``cls`` the first time)."""
        options = dict(load_options)
        if backend == "torch" and options.get("device") == "cpu" and _torch_default_device() == "cpu":
            del options["device"]  # the same load as the default: share it
        key = (str(root), backend, tuple(sorted((k, str(v)) for k, v in options.items())))
        if key not in self._components:
            self._components[key] = cls(root, backend=backend, progress=False, **load_options).components
        return self._components[key]

    def pipeline(self, cls: type, root: Path, backend: str = "mlx", scheduler: str | None = None,
                 **load_options: Any) -> Any:
        """A new ``cls`` pipeline on the cached model, with sampler ``scheduler`` (default: the model's)."""
        return cls(components=self.components(cls, root, backend, **load_options), progress=False,
                   scheduler=scheduler)
