"""Peak memory of one generation, by pipeline, size and preset: the rows of the README's memory tables.

Each row is a fresh worker process. MLX rows report ``mx.get_peak_memory()`` over the whole process
(loading included) with float16 weights: on this CPU, the proxy for what Metal would need. Torch rows
report the process's peak RSS (Python and the libraries included). The networks are the full
architectures with random weights (``random_models.py``, built once); memory does not depend on the
weights' values, so one sampling step (classifier-free guidance, batch 1) gives the peak of any step
count: every step repeats the first one's allocations. The phases say what holds the peak: ``weights``
(active memory once every network has run), ``encode+step`` (text encoding and the first UNet step)
and ``decode`` (the VAE; with more steps, the later steps too).

    python benchmarks/benchmark_memory.py --rows sd15-512 sd15-512-low --json benchmarks/results-memory-cpu-2core.json
    python benchmarks/benchmark_memory.py --list
    python benchmarks/benchmark_memory.py --rows sdxl-1024 --phase step --json ...   # then --phase decode: a row
                                                    # longer than one sitting, one phase per process, merged

Rows already in the JSON file are kept (rows are run one at a time, each under ten minutes here).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("MLX_STABLEFUSED_CACHE", Path.home() / ".cache" / "mlx-stablefused"))
MODELS = {"sd15": CACHE / "bench-sd15-full", "sdxl": CACHE / "bench-sdxl-random"}
ADAPTER = CACHE / "bench-motion-adapter-random"  # benchmark_sd.py's random v1-5-2 adapter


def _row(pipeline: str, size: int, backend: str = "mlx", frames: int = 0, low: bool = False,
         unet_bits: int | None = None, dtype: str = "float16") -> dict:
    return dict(pipeline=pipeline, size=size, backend=backend, frames=frames, low_memory=low, unet_bits=unet_bits,
                dtype=dtype)


# torch's CPU float16 convolutions are unusable (a 320-channel 3x3 convolution on a 64x64 map took 27 s, 0.12 s in
# float32, torch 2.13 on this 2-core EPYC): its rows run in float32.
TORCH_CPU_DTYPE = "float32"


ROWS = {
    **{f"sd15-{s}": _row("sd15", s) for s in (256, 512, 768, 1024)},
    **{f"sd15-{s}-low": _row("sd15", s, low=True) for s in (256, 512, 768, 1024)},
    "sd15-512-low-8bit": _row("sd15", 512, low=True, unet_bits=8),
    "sd15-512-low-halves-together": {**_row("sd15", 512, low=True), "unet_batch_size": None},
    "sd15-512-sliced": {**_row("sd15", 512), "attention_slicing": True},  # the default + enable_attention_slicing()
    "sd15-512-torch": _row("sd15", 512, backend="torch", dtype=TORCH_CPU_DTYPE),
    "sd15-512-torch-low": _row("sd15", 512, backend="torch", low=True, dtype=TORCH_CPU_DTYPE),
    **{f"sdxl-{s}": _row("sdxl", s) for s in (256, 512, 768, 1024)},
    **{f"sdxl-{s}-low": _row("sdxl", s, low=True) for s in (256, 512, 768, 1024)},
    "sdxl-1024-low-8bit": _row("sdxl", 1024, low=True, unet_bits=8),
    "animatediff-16x512": _row("animatediff", 512, frames=16),
    "animatediff-16x256": _row("animatediff", 256, frames=16),
    "animatediff-16x128": _row("animatediff", 128, frames=16),
    **{f"animatediff-16x{s}-low": _row("animatediff", s, frames=16, low=True) for s in (128, 256, 512)},
}


# ----------------------------------------------------------------------------------- worker side
def worker(spec: dict) -> dict:
    """Load, generate one step at ``spec``'s size, report the peaks (this process is the row's alone).

    ``spec["phase"]``: "all" (one run), or one phase per process where a row would not fit ten minutes
    (SDXL at 1024x1024 on two cores): "step" (text encoding and the first step, no decode) or "decode" (the
    VAE decoding the row's latent after a small run has left the networks as a full run leaves them)."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
    backend = spec["backend"]
    if backend == "torch":
        import torch  # before mlx_stablefused, whose import preloads OpenBLAS globally

        torch.set_num_threads(os.cpu_count() or 1)
    from mlx_stablefused import TextToImageDiffusion, TextToVideoDiffusion

    model = MODELS["sd15" if spec["pipeline"] == "animatediff" else spec["pipeline"]]
    t0 = time.perf_counter()
    dtype = spec.get("dtype", "float16")
    if spec["frames"]:
        pipe = TextToVideoDiffusion(str(model), motion_adapter=str(ADAPTER), backend=backend, dtype=dtype,
                                    progress=False)
    else:
        pipe = TextToImageDiffusion(str(model), backend=backend, dtype=dtype, progress=False)
    if spec["low_memory"]:
        pipe.enable_low_memory(unet_bits=spec["unet_bits"], unet_batch_size=spec.get("unet_batch_size", 1))
    if spec.get("attention_slicing"):
        pipe.enable_attention_slicing()
    load_s = time.perf_counter() - t0
    peak = _peak_reader(backend)
    phases = {"load": peak(reset=True)}
    phase_s = {}

    def after_first_step(p, step, timestep, tensors):
        if step == 0:
            phases["encode+step"] = peak(reset=True)
            phase_s["encode+step"] = time.perf_counter() - t1
        return tensors

    size, frames = spec["size"], spec["frames"]
    latent_shape = (1, 4, frames, size // 8, size // 8) if frames else (1, 4, size // 8, size // 8)
    latent = np.random.default_rng(0).standard_normal(latent_shape).astype(np.float32)
    prompt, phase = "a photograph of an astronaut riding a horse", spec.get("phase", "all")
    if phase == "decode":  # the networks as a run leaves them for its decode: one guided step at 64x64 loads and
        # runs them, and (low_memory) frees the text encoders and the UNet, as at any size
        small = np.random.default_rng(0).standard_normal(latent_shape[:-2] + (8, 8)).astype(np.float32)
        pipe(prompt, num_inference_steps=1, guidance_scale=7.5, latent=small, output_type="latent")
        phases["before decode"] = peak(reset=True)
        t1 = time.perf_counter()
        out = pipe.resolve_output(latent=latent, output_type="np")
    else:
        t1 = time.perf_counter()
        out = pipe(prompt, num_inference_steps=1, guidance_scale=7.5, latent=latent,
                   output_type="latent" if phase == "step" else "np", callback_on_step_end=after_first_step)
    run_s = time.perf_counter() - t1
    if phase != "step":
        phases["decode"] = peak(reset=False)
        phase_s["decode"] = run_s - phase_s.get("encode+step", 0.0)
    result = {**spec, "cpu": cpu_description(), "load_s": load_s, "run_s": run_s, "phase_s": phase_s, "steps": 1,
              "peak_mb": max(phases.values()), "phase_peak_mb": phases,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "finite": bool(np.isfinite(np.asarray(out)).all())}
    if backend == "mlx":
        import mlx.core as mx

        from mlx_stablefused import _blas

        result["blas"] = _blas.status if "openblas" not in os.environ.get("LD_PRELOAD", "") else \
            f"LD_PRELOAD={os.environ['LD_PRELOAD']}"
        result["weights_mb"] = mx.get_active_memory() / 2**20  # every network materialised (the text encoder
        # re-read lazily when released, so not counted then)
    return result


def cpu_description() -> str:
    """This machine's CPU as the row ran on it: model name, core count and its vector extensions."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        info = Path("/proc/cpuinfo").read_text()
        model = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        flags = set(next(line.split(":", 1)[1] for line in info.splitlines() if line.startswith("flags")).split())
    except (OSError, StopIteration):
        pass
    extensions = ", ".join(f for f in ("avx", "avx2", "fma", "avx512f") if f in flags) or "no AVX"
    return f"{model}, {os.cpu_count()} cores ({extensions})"


def _peak_reader(backend: str):
    """peak(reset) -> MB since the last reset: MLX's allocator peak, or the process RSS peak for torch."""
    if backend == "mlx":
        import mlx.core as mx

        def peak(reset: bool) -> float:
            value = mx.get_peak_memory() / 2**20
            if reset:
                mx.reset_peak_memory()
            return value
        return peak
    return lambda reset: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # RSS cannot be reset


# ------------------------------------------------------------------------------ orchestrator side
def prepare(spec: dict) -> None:
    """Build the random model once, and convert it into the MLX cache outside any measured run."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import random_models

    name = "sd15" if spec["pipeline"] == "animatediff" else spec["pipeline"]
    if not (MODELS[name] / "model_index.json").is_file():
        print(f"building the random {name} model in {MODELS[name]} (once) ...", file=sys.stderr)
        random_models.BUILDERS[name](MODELS[name])
    if spec["frames"] and not (ADAPTER / "config.json").is_file():
        from benchmark_sd import build_random_motion_adapter

        build_random_motion_adapter(ADAPTER)


def run_row(name: str, timeout_s: float, phase: str = "all") -> dict:
    spec = {**ROWS[name], **({"phase": phase} if phase != "all" else {})}
    prepare(spec)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    load_before = os.getloadavg()
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          env=env, timeout=timeout_s)  # the worker is killed past it
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-4000:]}")
    return {"row": name, **json.loads(proc.stdout.strip().splitlines()[-1]),
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "commit": _commit()}  # loads: 1, 5, 15 min


def _commit() -> str:
    """The checkout's commit (``+`` when files differ from it): which code a row measured."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return git("rev-parse", "--short", "HEAD") + ("+" if git("status", "--porcelain", "--untracked-files=no") else "")


def merge_phase(earlier: dict | None, run: dict) -> dict:
    """A row from its phases measured in separate processes: each phase's peak from its own run (the later run
    of a phase replaces the earlier), the row's peak the largest; ``phase_runs`` keeps every run whole."""
    runs = dict((earlier or {}).get("phase_runs", {}))
    runs[run["phase"]] = run
    own = {"step": "encode+step", "decode": "decode"}  # the phase each run measured
    phases = {own[name]: r["phase_peak_mb"][own[name]] for name, r in runs.items()}
    return {**{k: v for k, v in run.items() if k not in ("phase", "phase_peak_mb", "phase_s", "run_s", "load_s",
                                                         "peak_rss_mb", "finite")},
            "peak_mb": max(phases.values()), "phase_peak_mb": phases,
            "phase_s": {own[name]: r["phase_s"][own[name]] for name, r in runs.items()},
            "run_s": sum(r["run_s"] for r in runs.values()), "measured_in": "one process per phase",
            "phase_runs": runs}


def markdown_table(data: dict) -> str:
    """The README's table: one line per measured row, peaks in MB (2^20 bytes) and in GB (10^9 bytes)."""
    out = ["| row | pipeline | size | preset | peak MB | peak GB | encode+step MB | decode MB | run s | load avg |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in data["rows"].items():
        if "peak_mb" not in r:  # a row that did not finish (its note says why)
            out.append(f"| {name} | {r.get('note', 'not measured')} | | | | | | | | |")
            continue
        preset = "low_memory" + (f" + {r['unet_bits']}-bit UNet" if r["unet_bits"] else "") + \
            (", guidance halves side by side" if r.get("unet_batch_size", 1) is None else "") \
            if r["low_memory"] else "default" + (" + attention slicing" if r.get("attention_slicing") else "")
        what = r["pipeline"] + (f", {r['frames']} frames" if r["frames"] else "") + \
            f" ({r['backend']}, {r.get('dtype', 'float16')})"
        ph = r["phase_peak_mb"]
        load = "/".join(f"{x:.1f}" for x in r["loadavg_before"]) if "loadavg_before" in r else ""
        out.append(f"| {name} | {what} | {r['size']} | {preset} | {r['peak_mb']:.0f} | {r['peak_mb'] * 2**20 / 1e9:.2f} | "
                   f"{ph.get('encode+step', 0):.0f} | {ph.get('decode', 0):.0f} | {r['run_s']:.0f} | {load} |")
    return "\n".join(out)


def cpu_description() -> str:
    """The CPU's model name, core count and vector extensions (from /proc/cpuinfo where there is one)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.machine())
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    vector = [f.upper() for f in ("avx", "avx2", "fma", "f16c", "avx512f", "amx_tile") if f in flags]
    return f"{model}, {os.cpu_count()} cores ({', '.join(vector) or 'no AVX'})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", default=[], choices=sorted(ROWS), metavar="ROW")
    p.add_argument("--list", action="store_true", help="list the rows")
    p.add_argument("--table", action="store_true", help="print the --json file's rows as a markdown table")
    p.add_argument("--json", default=None, help="merge the results into this file")
    p.add_argument("--timeout", type=float, default=600, help="seconds a row may run (default 600)")
    p.add_argument("--phase", default="all", choices=("all", "step", "decode"),
                   help="measure one phase of the rows in this process (merged into the --json row): for rows "
                        "longer than one sitting")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.table:
        print(markdown_table(json.loads(Path(args.json).read_text())))
        return
    if args.list or not args.rows:
        print("\n".join(f"{k:22s} {v}" for k, v in ROWS.items()))
        return
    path = Path(args.json) if args.json else None
    data = json.loads(path.read_text()) if path and path.is_file() else {"cpu": cpu_description(), "rows": {}}
    for name in args.rows:
        row = run_row(name, args.timeout, args.phase)
        if args.phase != "all":
            row = merge_phase(data["rows"].get(name) if "phase_runs" in data["rows"].get(name, {}) else None, row)
        data["rows"][name] = row
        print(f"{name:22s} peak {row['peak_mb']:8.0f} MB  phases {row['phase_peak_mb']}  "
              f"{row['run_s']:.0f} s", file=sys.stderr)
        if path:
            path.write_text(json.dumps(data, indent=2))


if __name__ == "__main__":
    main()
