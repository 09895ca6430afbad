"""What DeepCache and ToMe buy, and what they change: the same denoising run (text-to-image, DDIM, classifier-free
guidance, output_type="latent" so the VAE is not timed) exact and with each speed-up, on one backend per fresh
process, variants alternating round by round; the full SD 1.5 architecture with random weights (built once).

    python benchmarks/benchmark_unet_speedups.py                   # 512x512, 3 steps, 1 round, MLX and torch
    python benchmarks/benchmark_unet_speedups.py --backends torch --steps 6 --rounds 2 --json out.json

Per backend and variant: median seconds per step, the ratio to the exact path's (measured in the same process),
each step's time (DeepCache's full and shallow evaluations), and the final latent's difference from the exact
path's (same seed): max abs and relative L2. Random weights say nothing about image quality: judge that on real
weights. Timings never enter the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# name -> (enable_deepcache kwargs or None, enable_token_merging kwargs or None); the defaults of both methods
VARIANTS = {
    "exact": (None, None),
    "deepcache": (dict(interval=3, branch=0), None),
    "tome": (None, dict(ratio=0.5)),
    "deepcache+tome": (dict(interval=3, branch=0), dict(ratio=0.5)),
}


def worker(args: argparse.Namespace) -> dict:
    """All variants of one backend in this (fresh) process: load once, warm up, alternate, report."""
    import numpy as np

    from mlx_stablefused import TextToImageDiffusion

    pipe = TextToImageDiffusion(args.model, backend=args.backend, dtype=args.dtype, progress=False, scheduler="ddim")
    size, steps = args.size, args.steps
    latent = np.random.default_rng(0).standard_normal((1, 4, size // 8, size // 8)).astype(np.float32)
    call = dict(prompt="a photograph of an astronaut riding a horse", image_height=size, image_width=size,
                guidance_scale=args.guidance, latent=latent, output_type="latent")

    def run(name: str, n: int) -> tuple[np.ndarray, list[float]]:
        deepcache, tome = VARIANTS[name]
        pipe.disable_deepcache()
        pipe.disable_token_merging()
        if deepcache:
            pipe.enable_deepcache(**deepcache)
        if tome:
            pipe.enable_token_merging(**tome)
        marks = [time.perf_counter()]
        out = pipe(num_inference_steps=n, callback_on_step_end=lambda *a: marks.append(time.perf_counter()), **call)
        return np.asarray(out), [b - a for a, b in zip(marks, marks[1:])]

    if not args.no_warmup:
        run("exact", 1)
    names = list(args.variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    step_times: dict[str, list[list[float]]] = {n: [] for n in names}
    latents: dict[str, np.ndarray] = {}
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            out, per_step = run(name, steps)
            times[name].append(sum(per_step) / steps)
            step_times[name].append(per_step)
            latents[name] = out
            print(f"[{args.backend}] round {r + 1} {name}: {sum(per_step) / steps:.2f} s/step", file=sys.stderr)
    exact = latents["exact"].astype(np.float64)
    rows = {}
    for name in names:
        diff = latents[name].astype(np.float64) - exact
        rows[name] = {"per_step_s": statistics.median(times[name]), "per_step_runs": times[name],
                      "step_times_s": step_times[name], "latent_max_abs": float(np.abs(diff).max()),
                      "latent_rel_l2": float(np.linalg.norm(diff) / np.linalg.norm(exact))}
    for row in rows.values():
        row["speedup_vs_exact"] = rows["exact"]["per_step_s"] / row["per_step_s"]
    settings = pipe.backend.settings
    return {"backend": args.backend, "rows": rows,
            "cpu_streams": getattr(settings, "cpu_streams", None), "latent_abs_mean": float(np.abs(exact).mean())}


def evaluation_worker(args: argparse.Namespace) -> dict:
    """Single UNet evaluations, alternated round by round so both sides of every ratio see the same machine load:
    a full one (the exact path's cost; it keeps DeepCache's features), DeepCache's shallow one from them, one with
    ToMe, and DeepCache's shallow one with ToMe."""
    from dataclasses import replace

    import numpy as np

    from mlx_stablefused import TextToImageDiffusion
    from mlx_stablefused.deep_cache import DeepCacheConfig, DeepCacheRun
    from mlx_stablefused.token_merging import TokenMergingConfig

    pipe = TextToImageDiffusion(args.model, backend=args.backend, dtype=args.dtype, progress=False, scheduler="ddim")
    b, size = pipe.backend, args.size
    batch = 2 if args.guidance != 1.0 else 1  # the guidance batch [uncond; cond]
    latent = b.latent_from_numpy(np.random.default_rng(0).standard_normal((batch, 4, size // 8, size // 8))
                                 .astype(np.float32))
    positive, negative = pipe.encode_prompt(["a photograph of an astronaut riding a horse"], [""])
    cond = positive if batch == 1 else type(positive).concat([negative, positive], b.concat)
    plain, tome = pipe.settings, replace(pipe.settings, token_merging=TokenMergingConfig(ratio=0.5))

    def timed(settings, index, run) -> float:
        with b.using(settings), b.evaluation(index, run):
            start = time.perf_counter()
            b.to_numpy(b.unet(latent, 500.0, cond))
            return time.perf_counter() - start

    samples: dict[str, list[float]] = {k: [] for k in ("full", "deepcache_shallow", "tome", "deepcache_shallow+tome")}
    for r in range(1 if args.no_warmup else 0, args.evaluations + 1):  # round 0 warms up
        cache, cache_tome = (DeepCacheRun(DeepCacheConfig(interval=2, branch=0), 2) for _ in range(2))
        order = [("full", plain, 0, cache), ("deepcache_shallow", plain, 1, cache), ("tome", tome, 0, cache_tome),
                 ("deepcache_shallow+tome", tome, 1, cache_tome)]
        if r % 2 == 0:  # the ToMe pair first every other round
            order = order[2:] + order[:2]
        for name, settings, index, run in order:
            seconds = timed(settings, index, run)
            if r:
                samples[name].append(seconds)
                print(f"[{args.backend}] round {r} {name}: {seconds:.2f} s", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in samples.items()}
    full, shallow, merged, both = (med[k] for k in samples)
    return {"backend": args.backend, "batch": batch, "evaluation_s": med, "evaluation_runs_s": samples,
            "speedup_per_step": {"deepcache interval 3": 3 * full / (full + 2 * shallow), "tome": full / merged,
                                 "deepcache interval 3 + tome": 3 * full / (merged + 2 * both)}}


def run_worker(backend: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", backend, "--model", str(args.model), "--size", str(args.size),
           "--steps", str(args.steps), "--rounds", str(args.rounds), "--dtype", args.dtype, "--guidance",
           str(args.guidance),
           "--variants", *args.variants, "--evaluations", str(args.evaluations)] + \
        (["--no-warmup"] if args.no_warmup else [])
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    if proc.returncode != 0:
        raise RuntimeError(f"the {backend} run failed (its stderr is above)")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    from benchmark_previews import cpu_model
    from benchmark_sd import build_random_sd15, default_model_dir

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="diffusers SD folder (default: random SD 1.5, built once)")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=3, help="DDIM steps (3: one full and two DeepCache evaluations)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--guidance", type=float, default=7.5, help="guidance scale (1.0: no CFG, one UNet pass per step)")
    p.add_argument("--backends", nargs="+", default=["mlx", "torch"], choices=["mlx", "torch"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--no-warmup", action="store_true", help="skip the one-step exact warm-up")
    p.add_argument("--evaluations", type=int, default=0,
                   help="instead of whole runs: time this many rounds of single UNet evaluations (full, DeepCache's "
                        "shallow one, ToMe, both), alternated so load changes hit both sides of each ratio")
    p.add_argument("--json", default=None, help="write every number here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--backend", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if "exact" not in args.variants:
        args.variants = ["exact", *args.variants]
    if args.worker:
        args.backend = args.worker
        print(json.dumps(evaluation_worker(args) if args.evaluations else worker(args)))
        return
    if args.model is None:
        args.model = str(default_model_dir())
        if not (Path(args.model) / "model_index.json").is_file():
            print(f"building the random SD 1.5 model in {args.model} (once) ...", file=sys.stderr)
            build_random_sd15(Path(args.model))
    results = {b: run_worker(b, args) for b in args.backends}
    model = "SD 1.5 architecture, random weights" if args.model == str(default_model_dir()) else args.model
    print(f"\n{cpu_model()}, {os.cpu_count()} cores; {model}, {args.size}x{args.size}, "
          f"{args.steps} DDIM steps, {'CFG' if args.guidance != 1.0 else 'no CFG'}, {args.dtype}, {args.rounds} round(s)")
    if args.evaluations:
        print("| backend | full s | DeepCache shallow s | ToMe s | shallow + ToMe s | DeepCache 1:3 x | ToMe x | both x |")
        print("|---|---|---|---|---|---|---|---|")
        for backend, result in results.items():
            e, x = result["evaluation_s"], list(result["speedup_per_step"].values())
            print(f"| {backend} | {e['full']:.2f} | {e['deepcache_shallow']:.2f} | {e['tome']:.2f} | "
                  f"{e['deepcache_shallow+tome']:.2f} | {x[0]:.2f} | {x[1]:.2f} | {x[2]:.2f} |")
    print("| backend | variant | s/step | x exact (speed-up) | latent max abs | latent rel. L2 |")
    print("|---|---|---|---|---|---|")
    for backend, result in results.items():
        for name, row in result.get("rows", {}).items():
            print(f"| {backend} | {name} | {row['per_step_s']:.2f} | {row['speedup_vs_exact']:.2f} | "
                  f"{row['latent_max_abs']:.3g} | {row['latent_rel_l2']:.3g} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_model(), "cores": os.cpu_count(), "size": args.size,
                                               "steps": args.steps, "guidance_scale": args.guidance, "rounds": args.rounds, "dtype": args.dtype,
                                               "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
