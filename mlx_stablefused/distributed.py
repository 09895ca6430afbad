"""The process group a generation runs in when launched on several processes or machines.

``mlx.launch`` (MLX's ring, JACCL, MPI or NCCL backends) and ``torchrun`` (torch.distributed: gloo on
CPU, NCCL on CUDA) start one process per rank; each loads the model. Here: finding that group
(``current_group``), exchanging numpy arrays with the engine's own ``all_gather`` (no transport of
our own), a bound on every wait (``timeout_seconds``), and the start-up check that every rank runs
the same model with the same arguments (``check_same_run``). What is split across ranks is
``pipelines/data_parallel.py``'s part.

Faults: a rank that dies shows up on the survivors as the engine's error at their next exchange (MLX's
ring backend: "connection to a peer was lost"; gloo: "Connection closed by peer"), re-raised as
``DistributedError``. A rank that hangs is bounded by the timeout: torch.distributed enforces it itself;
MLX's collectives have none, so a watchdog ends the process (exit code ``DEADLINE_EXIT_CODE``) with a
one-line message: a C++ collective cannot be interrupted from Python, and leaving is what NCCL's own
watchdog does.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import zlib
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .env_settings import positive_from_env
from .errors import DistributedError

ENV_TIMEOUT = "MLX_STABLEFUSED_DISTRIBUTED_TIMEOUT"  # seconds any rank waits for the others (default 600)
DEFAULT_TIMEOUT_S = 600.0
DEADLINE_EXIT_CODE = 124  # as timeout(1): the process left because a collective outlived the timeout
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
MLX_LAUNCH_VARIABLES = ("MLX_RANK", "OMPI_COMM_WORLD_RANK")  # ring / JACCL / NCCL, and MPI (mpirun)


def timeout_seconds() -> float:
    """The bound on every wait for another rank: ``MLX_STABLEFUSED_DISTRIBUTED_TIMEOUT`` or 600 s."""
    return positive_from_env(ENV_TIMEOUT, DEFAULT_TIMEOUT_S, float, "seconds")


def launcher() -> str | None:
    """Which launcher started this process as one of several ranks: "torch" (torchrun), "mlx"
    (mlx.launch / mpirun), or None (a single process)."""
    env = os.environ
    if all(v in env for v in TORCHRUN_VARIABLES) and int(env["WORLD_SIZE"]) > 1:
        return "torch"
    if any(v in env for v in MLX_LAUNCH_VARIABLES):
        return "mlx"
    return None


HEADER_MAGIC = 0x5D1F_0001  # marks a header that a live rank sent (a lost peer can leave other bytes)
PAYLOAD_MAGIC = 0x5D1F_0002
MAX_AXES = 7


class Group(ABC):
    """The ranks of one launch; arrays cross as numpy, through the engine's all_gather.

    Every exchange is checked: a header first (a magic number, the exchange's sequence number, the shape
    and dtype), then the payload with a CRC-32 of its bytes. MLX's ring backend can hand back stale bytes
    instead of an error when a peer died while the survivor was computing; the checks turn that, a rank
    that runs another request, and shapes that differ into a ``DistributedError`` on every rank."""

    engine: str = ""
    rank: int = 0
    size: int = 1
    sequence: int = 0  # exchanges so far: every rank makes the same ones, in the same order

    @abstractmethod
    def _all_gather(self, array: np.ndarray) -> np.ndarray:
        """Every rank's ``array`` (same shape and dtype on all ranks), stacked: (size, *shape)."""

    def _raw_gather(self, array: np.ndarray, what: str) -> np.ndarray:
        try:
            return self._all_gather(np.ascontiguousarray(array))
        except DistributedError:
            raise
        except RuntimeError as e:  # the engine's report of a lost peer or an expired wait
            raise self.error(what, f"{e}. Another rank died or stopped") from e

    def error(self, what: str, problem: str) -> DistributedError:
        return DistributedError(f"rank {self.rank} of {self.size} ({self.engine}): {what}: {problem}; "
                                "nothing was written.")

    def all_gather(self, array: np.ndarray, what: str) -> np.ndarray:
        """(size, *shape): every rank's ``array`` in rank order, checked (see the class). ``what`` names the
        exchange in errors."""
        array = np.ascontiguousarray(array)
        if array.ndim > MAX_AXES:
            raise ValueError(f"{what}: at most {MAX_AXES} axes cross ranks, got {array.ndim}")
        self.sequence += 1
        header = np.zeros(4 + MAX_AXES, np.int64)
        header[:4] = HEADER_MAGIC, self.sequence, np.dtype(array.dtype).num, array.ndim
        header[4:4 + array.ndim] = array.shape
        headers = self._raw_gather(header.astype(np.int32), what)
        lost = [r for r in range(self.size) if headers[r, 0] != HEADER_MAGIC]
        if lost:
            raise self.error(what, f"no valid answer from rank(s) {lost} (a rank died, or the connection broke)")
        behind = [r for r in range(self.size) if headers[r, 1] != self.sequence]
        if behind:
            raise self.error(what, f"rank(s) {behind} are at another exchange (they run another request or "
                                   "stopped early, e.g. an interrupt() on some ranks only)")
        if (headers[:, 2:] != headers[0, 2:]).any():
            shapes = [tuple(int(n) for n in h[4:4 + h[3]]) for h in headers]
            raise self.error(what, f"the ranks hold different shapes {shapes} (an interrupt() on some ranks only, "
                                   "or ranks running different requests)")
        data = array.reshape(-1).view(np.uint8)
        trailer = np.array([zlib.crc32(data), PAYLOAD_MAGIC], np.uint32).view(np.uint8)
        payloads = self._raw_gather(np.concatenate([data, trailer]), what)
        for r in range(self.size):
            crc, magic = payloads[r, -8:].view(np.uint32)
            if magic != PAYLOAD_MAGIC or crc != zlib.crc32(payloads[r, :-8]):
                raise self.error(what, f"the data from rank {r} arrived damaged (a rank died, or the connection broke)")
        return payloads[:, :-8].copy().view(array.dtype).reshape(self.size, *array.shape)


class MLXGroup(Group):
    engine = "mlx.distributed"

    def __init__(self, group: Any, timeout: float) -> None:
        self.group, self.timeout = group, timeout
        self.rank, self.size = int(group.rank()), int(group.size())

    def _all_gather(self, array: np.ndarray) -> np.ndarray:
        import mlx.core as mx

        with deadline(self.timeout, f"rank {self.rank} of {self.size}: a collective"):
            out = mx.distributed.all_gather(mx.array(array[None]), group=self.group, stream=mx.cpu)
            out = np.array(out)
        return out.reshape(self.size, *array.shape)


class TorchGroup(Group):
    engine = "torch.distributed"

    def __init__(self, timeout: float) -> None:
        import datetime

        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            cuda = torch.cuda.is_available()
            if cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout))
        self.dist, self.torch = dist, torch
        self.device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        self.rank, self.size = int(dist.get_rank()), int(dist.get_world_size())
        self.engine = f"torch.distributed ({dist.get_backend()})"

    def _all_gather(self, array: np.ndarray) -> np.ndarray:
        tensor = self.torch.from_numpy(array.copy())
        if self.device is not None:
            tensor = tensor.to(self.device)
        parts = [self.torch.empty_like(tensor) for _ in range(self.size)]
        self.dist.all_gather(parts, tensor)
        return np.stack([p.cpu().numpy() for p in parts])


@contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    """Leave the process with a one-line message if the block outlives ``seconds`` (MLX's collectives
    have no timeout of their own)."""
    done = threading.Event()

    def watch() -> None:
        if not done.wait(seconds):
            sys.stderr.write(f"mlx_stablefused: error: {what} waited more than {seconds:g} s for the other ranks "
                             f"({ENV_TIMEOUT}); a rank died or hangs. Exiting; nothing was written.\n")
            sys.stderr.flush()
            os._exit(DEADLINE_EXIT_CODE)

    threading.Thread(target=watch, name="distributed-deadline", daemon=True).start()
    try:
        yield
    finally:
        done.set()


_GROUP: list[Group | None] = []  # found once per process


def current_group() -> Group | None:
    """The group of this launch (found and initialised on first use), or None in a single process."""
    if not _GROUP:
        _GROUP.append(_find_group())
    return _GROUP[0]


def _find_group() -> Group | None:
    kind = launcher()
    if kind == "torch":
        group: Group = TorchGroup(timeout_seconds())
    elif kind == "mlx":
        import mlx.core as mx

        if not mx.distributed.is_available():
            raise DistributedError("launched by mlx.launch / mpirun, but this MLX build has no distributed backend")
        group = MLXGroup(mx.distributed.init(), timeout_seconds())
    else:
        return None
    return group if group.size > 1 else None


def is_writer() -> bool:
    """Whether this process writes files: rank 0 of a launch, or a single process."""
    group = current_group() if launcher() else None
    return group is None or group.rank == 0


def bind_local_device() -> None:
    """Under torchrun on a CUDA machine, make "cuda" mean this rank's GPU (LOCAL_RANK) before a model loads."""
    if launcher() != "torch" or "LOCAL_RANK" not in os.environ:
        return
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())


# ------------------------------------------------------------------------------ same model, same run
SAMPLES_PER_TENSOR = 64  # values per weight tensor in the digest: different checkpoints differ everywhere


def fingerprint(value: Any) -> bytes:
    """A stable digest of a call's arguments: numbers and strings by value, arrays and images by content,
    callables by name."""
    digest = hashlib.sha256()
    _feed(digest, value)
    return digest.digest()


def _feed(digest: Any, value: Any) -> None:
    from PIL import Image

    from .backends.base import as_numpy
    from .utils.array_types import is_mlx, is_torch

    if value is None or isinstance(value, (bool, int, float, str, bytes, Path)):
        digest.update(repr(value).encode())
    elif isinstance(value, np.generic):
        digest.update(repr(value.item()).encode())
    elif isinstance(value, (np.ndarray,)) or is_mlx(value) or is_torch(value):
        array = np.ascontiguousarray(as_numpy(value))
        digest.update(f"array{array.shape}{array.dtype}".encode())
        digest.update(array.tobytes())
    elif isinstance(value, Image.Image):
        digest.update(f"image{value.mode}{value.size}".encode())
        digest.update(value.tobytes())
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            digest.update(f"key{key!r}".encode())
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"seq{len(value)}".encode())
        for item in value:
            _feed(digest, item)
    elif is_dataclass(value) and not isinstance(value, type):
        digest.update(type(value).__name__.encode())
        _feed(digest, {f.name: getattr(value, f.name) for f in fields(value)})
    elif hasattr(value, "value") and type(value).__module__.startswith("mlx_stablefused"):  # enums
        digest.update(repr(value).encode())
    elif callable(value):
        digest.update(f"callable {getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__name__)}"
                      .encode())
    else:
        digest.update(f"object {type(value).__module__}.{type(value).__qualname__}".encode())


def model_fingerprint(backend: Any) -> bytes:
    """The configs of every loaded network and a digest of its weights (name, shape, dtype and an even
    sample of the values of every tensor)."""
    digest = hashlib.sha256()
    _feed(digest, {name: repr(config) for name, config in sorted(getattr(backend, "configs", {}).items())})
    for name, module in sorted(getattr(backend, "components", {}).items()):
        for key, shape, sample in _weight_samples(module):
            digest.update(f"{name}.{key}{shape}{sample.dtype}".encode())
            digest.update(np.ascontiguousarray(sample).tobytes())
    return digest.digest()


def _weight_samples(module: Any) -> Iterator[tuple[str, tuple[int, ...], np.ndarray]]:
    """(name, shape, an even sample of the values as numpy) for every weight of an MLX or torch module."""
    if hasattr(module, "state_dict") and hasattr(module, "named_parameters"):  # torch
        import torch

        for key, tensor in module.state_dict().items():
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // SAMPLES_PER_TENSOR)
            part = flat[::step][:SAMPLES_PER_TENSOR]
            if part.is_floating_point():
                part = part.to(torch.float32)
            yield key, tuple(tensor.shape), part.cpu().numpy()
    else:  # MLX
        import mlx.core as mx
        from mlx.utils import tree_flatten

        for key, array in tree_flatten(module.parameters()):
            flat = array.reshape(-1)
            step = max(1, flat.size // SAMPLES_PER_TENSOR)
            part = flat[::step][:SAMPLES_PER_TENSOR]
            if mx.issubdtype(part.dtype, mx.floating):
                part = part.astype(mx.float32)
            yield key, tuple(array.shape), np.array(part)


def check_same_run(group: Group, backend: Any, settings: Any, call: str, arguments: dict[str, Any]) -> None:
    """Refuse, on every rank and before any work, a launch whose ranks differ in the model (configs and
    weights), its settings (backend, dtype, sampler, run settings) or the call and its arguments."""
    parts = {"model (configs and weight digest)": model_fingerprint(backend),
             "settings (backend, dtype, sampler, run settings)": fingerprint(settings),
             f"arguments of {call}": fingerprint([call, arguments])}
    mine = np.frombuffer(b"".join(parts.values()), np.uint8).reshape(len(parts), -1)
    everyone = group.all_gather(mine, f"the start-up check of {call}")
    for index, what in enumerate(parts):
        differ = [r for r in range(group.size) if (everyone[r, index] != everyone[0, index]).any()]
        if differ:
            raise DistributedError(f"rank {group.rank} of {group.size}: rank(s) {differ} run a different {what} "
                                   "than rank 0; every rank must load the same model and make the same call. "
                                   "Nothing was generated.")


def agreed_seed(group: Group, seed: Any) -> Any:
    """``seed`` when given (checked equal with the arguments); with none, rank 0's fresh one for every
    rank, so that one noise is drawn everywhere."""
    if seed is not None:
        return seed
    mine = np.array([np.random.default_rng().integers(0, 2**31 - 1)], np.int64).view(np.int32)
    return int(group.all_gather(mine, "agreeing on a seed")[0].view(np.int64)[0])


__all__ = ["DistributedError", "Group", "MLXGroup", "TorchGroup", "current_group", "launcher", "is_writer",
           "check_same_run", "agreed_seed", "fingerprint", "model_fingerprint", "timeout_seconds",
           "bind_local_device", "ENV_TIMEOUT", "DEADLINE_EXIT_CODE"]
