"""The OpenBLAS preload: a library named by MLX_STABLEFUSED_OPENBLAS is loaded or refused, never skipped."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def preload(env: dict, before: str = "") -> subprocess.CompletedProcess:
    code = before + "from mlx_stablefused import _blas; print(_blas.preload_openblas())"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MLX_STABLEFUSED_")}
    return subprocess.run([sys.executable, "-c", code], env={**clean, "PYTHONPATH": str(ROOT), **env},
                          capture_output=True, text=True, timeout=60)


def test_named_library_that_cannot_load_is_an_error(tmp_path):
    missing = tmp_path / "libopenblas.so.0"
    done = preload({"MLX_STABLEFUSED_OPENBLAS": str(missing)})
    assert done.returncode != 0
    assert f"MLX_STABLEFUSED_OPENBLAS={missing} could not be loaded" in done.stderr


def test_opt_out_wins_over_a_named_library(tmp_path):
    done = preload({"MLX_STABLEFUSED_OPENBLAS": str(tmp_path / "x.so"), "MLX_STABLEFUSED_NO_OPENBLAS": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "disabled by MLX_STABLEFUSED_NO_OPENBLAS"


def test_status_names_the_kernels_openblas_chose():
    """With a system OpenBLAS, the status says which core's kernels it runs (a library that does not say: nothing)."""
    import ctypes.util

    from mlx_stablefused._blas import core_note

    assert core_note(ctypes.CDLL(ctypes.util.find_library("m"))) == ""
    found = ctypes.util.find_library("openblas") or os.environ.get("MLX_STABLEFUSED_OPENBLAS")
    if found:
        done = preload({"MLX_STABLEFUSED_OPENBLAS": found})
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"loaded {found} (core "), done.stdout


def test_a_skipped_openblas_is_a_warning_naming_the_fix(tmp_path):
    """mlx.core imported first binds MLX's reference BLAS for good: said once, with the import order that avoids it;
    quiet when there was no OpenBLAS to load or the opt-out is set."""
    library = tmp_path / "libopenblas.so.0"
    library.write_bytes(b"")  # only named, never loaded: MLX is already bound
    done = preload({"MLX_STABLEFUSED_OPENBLAS": str(library)}, before="import mlx.core; ")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "skipped: mlx.core was imported before mlx_stablefused"
    assert f"instead of the OpenBLAS at {library}" in done.stderr
    assert "import mlx_stablefused.backends.mlx before mlx.core" in done.stderr
    quiet = preload({"MLX_STABLEFUSED_OPENBLAS": str(tmp_path / "none.so")}, before="import mlx.core; ")
    assert quiet.returncode == 0 and "RuntimeWarning" not in quiet.stderr, quiet.stderr
    opted_out = preload({"MLX_STABLEFUSED_OPENBLAS": str(library), "MLX_STABLEFUSED_NO_OPENBLAS": "1"},
                        before="import mlx.core; ")
    assert opted_out.stdout.strip() == "disabled by MLX_STABLEFUSED_NO_OPENBLAS" and "RuntimeWarning" not in opted_out.stderr
