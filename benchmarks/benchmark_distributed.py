"""1 rank vs 2 ranks (MLX's ring backend on localhost), the same threads per rank, on the full SD 1.5
architecture (random weights) at 256x256: a 16-frame interpolation's throughput, and guidance parallel's
time per step against one process.

    python benchmarks/benchmark_distributed.py --model ~/.cache/mlx-stablefused/bench-sd15-random --json out.json

Each measurement is a fresh launch (one process, or two ranks); the two sides alternate round by round so
machine drift hits both. Every rank runs one thread (OMP_NUM_THREADS=1, one CPU stream), so two ranks use
two cores where one process uses one. Prints and writes the timings, the ratio and the load average
around each run (other work on the machine makes ratios noisy). Timings never enter the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MLX_STABLEFUSED_CPU_STREAMS": "1"}


def worker(args: argparse.Namespace) -> None:
    """One rank (or the one process): load, warm up, time the work, print JSON on rank 0."""
    sys.path.insert(0, str(ROOT))
    from mlx_stablefused import LatentWalkDiffusion, TextToImageDiffusion
    from mlx_stablefused.distributed import current_group

    size = dict(image_height=args.size, image_width=args.size)
    if args.work == "interpolate":
        pipe = LatentWalkDiffusion(args.model, backend="mlx", progress=False)

        def work() -> None:
            pipe.interpolate(["a red cube", "a blue ball"], interpolation_steps=args.frames - 1,
                             num_inference_steps=args.steps, batch_size=args.batch_size, seed=0, output_type="np",
                             **size)
    else:
        pipe = TextToImageDiffusion(args.model, backend="mlx", progress=False,
                                    guidance_parallel=args.work == "guidance_parallel")

        def work() -> None:
            pipe("a lighthouse", num_inference_steps=max(args.steps, 3), seed=0, output_type="latent",
                 callback_on_step_end=lambda p, i, t, tensors: stamps.append(time.perf_counter()), **size)

    stamps: list[float] = []
    if args.work != "interpolate":
        work()  # warm-up: the first call allocates and converts
        stamps.clear()
    start = time.perf_counter()
    work()
    seconds = time.perf_counter() - start
    group = current_group()
    if group is None or group.rank == 0:
        out = {"work": args.work, "ranks": 1 if group is None else group.size, "seconds": seconds}
        if args.work == "interpolate":
            out["frames_per_s"] = args.frames / seconds
        else:
            out["s_per_step"] = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
        print("RESULT " + json.dumps(out), flush=True)


def free_ports(count: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def launch(args: argparse.Namespace, work: str, ranks: int) -> dict:
    """One process, or ``ranks`` ring processes on localhost: through ``mlx.launch`` with ``--launcher``,
    else started here with the hostfile mlx.launch would write (its output-forwarding loop costs CPU
    that the ranks need on a machine with few cores)."""
    command = [sys.executable, __file__, "--worker", "--work", work, "--model", str(args.model),
               "--size", str(args.size), "--steps", str(args.steps), "--frames", str(args.frames),
               "--batch-size", str(args.batch_size)]
    env = {**os.environ, **ONE_THREAD, "PYTHONPATH": str(ROOT)}
    load = os.getloadavg()[0]
    if ranks > 1 and args.launcher:
        command = ["mlx.launch", "-n", str(ranks), "--backend", "ring", "--", *command]
    if ranks > 1 and not args.launcher:
        import tempfile

        hostfile = Path(tempfile.mkdtemp()) / "hosts.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"] for port in free_ports(ranks)]))
        procs = [subprocess.Popen(command, env={**env, "MLX_RANK": str(r), "MLX_HOSTFILE": str(hostfile)},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(ranks)]
        outs = [p.communicate(timeout=args.timeout) for p in procs]
        stdout, stderr = "".join(o[0] for o in outs), "".join(o[1] for o in outs)
    else:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
        stdout, stderr = done.stdout, done.stderr
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise SystemExit(f"{work} on {ranks} rank(s) gave no result:\n{stdout[-2000:]}\n{stderr[-2000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    result.update(load_before=load, load_after=os.getloadavg()[0])
    print(json.dumps(result), file=sys.stderr, flush=True)
    return result


def main() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from benchmark_sd import positive_int

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="diffusers SD folder (default: benchmark_sd's random SD 1.5)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=2, help="denoising steps per frame (one image: at least 3)")
    p.add_argument("--frames", type=positive_int, default=16)
    p.add_argument("--batch-size", type=int, default=4, help="interpolate's batch_size (split across the ranks)")
    p.add_argument("--rounds", type=positive_int, default=1)
    p.add_argument("--only", choices=["interpolate", "guidance"], default=None)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--launcher", action="store_true", help="start the ranks with mlx.launch (default: directly)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--work", default="interpolate", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.model is None:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from benchmark_sd import build_random_sd15, default_model_dir

        args.model = str(default_model_dir())
        if not (Path(args.model) / "model_index.json").is_file():
            build_random_sd15(Path(args.model))
    if args.worker:
        return worker(args)
    runs: list[dict] = []
    for _ in range(args.rounds):
        if args.only in (None, "interpolate"):
            runs += [launch(args, "interpolate", 1), launch(args, "interpolate", 2)]
        if args.only in (None, "guidance"):
            runs += [launch(args, "one_image", 1), launch(args, "guidance_parallel", 2)]
    summary: dict = {}
    one = [r["frames_per_s"] for r in runs if r["work"] == "interpolate" and r["ranks"] == 1]
    two = [r["frames_per_s"] for r in runs if r["work"] == "interpolate" and r["ranks"] == 2]
    if one:
        summary["interpolate_throughput_ratio"] = (sum(two) / len(two)) / (sum(one) / len(one))
    single = [r["s_per_step"] for r in runs if r["work"] == "one_image"]
    parallel = [r["s_per_step"] for r in runs if r["work"] == "guidance_parallel"]
    if single:
        summary["guidance_parallel_step_ratio"] = (sum(parallel) / len(parallel)) / (sum(single) / len(single))
    report = {"settings": {k: str(v) for k, v in vars(args).items() if k not in ("worker", "work")},
              "cpu_count": os.cpu_count(), "runs": runs, "summary": summary}
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
