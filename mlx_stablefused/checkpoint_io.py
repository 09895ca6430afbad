"""Reading and writing weight files safely.

* safetensors headers are checked against the file size before any tensor is read, so a
  truncated download is reported as such instead of crashing inside a reader;
* PyTorch pickles (``.bin`` / ``.ckpt``) are read only with ``torch.load(weights_only=True)``,
  which refuses to execute code;
* every file we write lands under a temporary name and is renamed into place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .errors import WeightLoadError

SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


def check_safetensors(path: str | Path) -> dict:
    """Validate a safetensors file's header and length; return the header."""
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise WeightLoadError(f"{path} is truncated or not a safetensors file ({size} bytes)")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8:
            raise WeightLoadError(f"{path} is truncated or corrupt: its header claims {header_len} bytes "
                                  f"but the file has {size}")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightLoadError(f"{path} has a corrupt safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise WeightLoadError(f"{path} has a corrupt safetensors header")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError) as e:
            raise WeightLoadError(f"{path}: malformed header entry for {name!r}") from e
    expected = 8 + header_len + end
    if size < expected:
        raise WeightLoadError(f"{path} is truncated: its tensors need {expected} bytes but the file has {size} "
                              "(an interrupted download? delete it and fetch it again)")
    return header


def _torch_to_mx(tensor):
    import mlx.core as mx
    import torch

    if tensor.dtype == torch.bfloat16:
        return mx.array(tensor.float().numpy()).astype(mx.bfloat16)
    return mx.array(tensor.detach().cpu().numpy())


def load_pickle(path: str | Path) -> dict:
    """Tensors of a PyTorch checkpoint as MLX arrays, read without executing any pickled code."""
    return {k: _torch_to_mx(v) for k, v in load_torch_pickle(path).items()}


def _pickle_refusal(error: Exception) -> str:
    """One line for torch's multi-line refusal (which suggests weights_only=False: never do that here)."""
    text = str(error)
    unsafe = re.search(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)", text)
    detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    if unsafe or detail:
        what = f"a reference to {unsafe.group(1)}" if unsafe else detail.group(1).strip()
        return (f"it holds what a weights-only reader refuses ({what}); nothing was executed. "
                "Use a .safetensors file of this model")
    lines = [line.strip() for line in text.splitlines() if line.strip() and "weights_only" not in line]
    return lines[0] if lines else f"{type(error).__name__} (corrupt, or not a PyTorch checkpoint)"


def load_pickle_object(path: str | Path, mmap: bool = False) -> object:
    """Whatever a PyTorch checkpoint holds (nested dicts, tensors, numbers, strings), read with torch's
    weights-only unpickler: no pickled code is executed, and anything else is refused.

    ``mmap``: map the file instead of reading it (zip-format checkpoints; others are read): for looking
    at shapes, or taking a few tensors of a large file."""
    try:
        import torch
    except ImportError as e:
        raise WeightLoadError(f"{path} is a PyTorch pickle; reading it needs torch "
                              "(pip install 'mlx-stablefused[torch]'), or use a .safetensors file") from e
    try:
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=False)  # not zip-format
    except Exception as e:  # torch raises many types for corrupt or unsafe files
        raise WeightLoadError(f"could not read {path} as a safe PyTorch checkpoint: {_pickle_refusal(e)}") from e


def load_torch_pickle(path: str | Path, mmap: bool = False) -> dict:
    """Tensors of a PyTorch checkpoint (torch tensors), read without executing any pickled code;
    ``state_dict`` wrappers (nested, as some training scripts save them) are unwrapped."""
    state = load_pickle_object(path, mmap=mmap)
    import torch  # present: the read above needed it

    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightLoadError(f"{path} does not hold a dictionary of tensors")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _read_weight_file(path: str | Path, read_safetensors: Callable[[str], dict],
                      read_pickle: Callable[[Path], dict]) -> dict:
    path = Path(path)
    if not path.is_file():
        raise WeightLoadError(f"weight file {path} does not exist")
    if path.suffix == SAFETENSORS_SUFFIX:
        check_safetensors(path)
        try:
            return read_safetensors(str(path))
        except Exception as e:
            raise WeightLoadError(f"could not read {path}: {e}") from e
    if path.suffix in PICKLE_SUFFIXES:
        return read_pickle(path)
    raise WeightLoadError(f"{path}: unknown weight format {path.suffix!r} (expected .safetensors or .bin/.ckpt)")


def load_torch_weights(path: str | Path) -> dict:
    """All tensors of one weight file as torch tensors (CPU), in the file's own layout."""
    from safetensors.torch import load_file

    return _read_weight_file(path, load_file, load_torch_pickle)


def load_torch_tensors(path: str | Path, keys: set[str]) -> dict:
    """The tensors named ``keys`` of one weight file as torch tensors, reading no others (safetensors: opened
    in place; a pickle: memory-mapped where its format allows)."""
    from safetensors import safe_open

    def some(name: str) -> dict:
        with safe_open(name, framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in set(f.keys()) & set(keys)}

    def some_pickled(p: Path) -> dict:
        state = load_torch_pickle(p, mmap=True)
        return {k: state[k] for k in keys if k in state}

    return _read_weight_file(path, some, some_pickled)


def load_tensors(path: str | Path, keys: set[str]) -> dict:
    """The tensors named ``keys`` of one weight file as MLX arrays (safetensors: lazily; a pickle:
    memory-mapped, only these converted)."""
    import mlx.core as mx

    def some(name: str) -> dict:
        state = mx.load(name)
        return {k: state[k] for k in keys if k in state}

    def some_pickled(p: Path) -> dict:
        state = load_torch_pickle(p, mmap=True)
        return {k: _torch_to_mx(state[k]) for k in keys if k in state}

    return _read_weight_file(path, some, some_pickled)


def load_weights(path: str | Path) -> dict:
    """All tensors of one weight file, as (lazy) MLX arrays in the file's own layout."""
    import mlx.core as mx

    return _read_weight_file(path, mx.load, load_pickle)


def current_umask() -> int:
    """The process umask (read from /proc where possible: setting it to read it back is not thread-safe)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_permissions(path: Path, directory: bool = False) -> None:
    """Give ``path`` the mode a plain ``open()`` / ``mkdir()`` would (mkstemp and mkdtemp make it private)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


@contextmanager
def atomic_path(target: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".partial{suffix}", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        plain_permissions(tmp_path)
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def save_safetensors(path: str | Path, arrays: dict, metadata: dict[str, str] | None = None) -> None:
    """Write MLX arrays as safetensors, atomically."""
    import mlx.core as mx

    with atomic_path(path, suffix=SAFETENSORS_SUFFIX) as tmp:
        mx.save_safetensors(str(tmp), arrays, metadata=metadata or {})


def write_json(path: str | Path, obj: object) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
            f.write("\n")


def _json_default(o: object) -> object:
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"cannot serialise {type(o).__name__}")


@contextmanager
def atomic_directory(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name and move it onto ``target`` when complete."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists (pass overwrite=True to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield tmp
        plain_permissions(tmp, directory=True)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_numpy_safetensors(path: str | Path, arrays: dict[str, np.ndarray], metadata: dict[str, str] | None = None
                           ) -> None:
    """Write numpy arrays as safetensors, atomically (no framework needed)."""
    from safetensors.numpy import save_file

    with atomic_path(path, suffix=SAFETENSORS_SUFFIX) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp), metadata=metadata)
