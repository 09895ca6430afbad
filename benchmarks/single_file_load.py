"""Load time and peak memory: one full-size SD 1.5 fp16 single file vs the converted folder made from it.

Writes a random-weight SD 1.5 checkpoint in the original LDM naming (about 2 GB of fp16, shapes from the
diffusers architecture built on the meta device), converts it with ``mlx-stablefused convert``, then
loads each in fresh worker processes, alternating, until every weight is materialised (``mx.eval`` /
the torch tensors): seconds and peak RSS per load. Everything is written under ``--work`` and deleted
afterwards unless ``--keep``.

    python benchmarks/single_file_load.py --rounds 3 [--backend torch] [--work /tmp/sf-bench]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def write_checkpoint(path: Path) -> None:
    """Random fp16 tensors with the shapes and LDM names of SD 1.5 (numpy: no 4 GB fp32 model in memory)."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.numpy import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    import ldm_checkpoints as ldm

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu"))
    shapes = ldm.unet_to_ldm(unet.state_dict(), dict(unet.config))
    shapes.update(ldm.vae_to_ldm(vae.state_dict(), dict(vae.config)))
    shapes.update(ldm.clip_to_ldm(text.state_dict()))
    rng = np.random.default_rng(0)
    state = {k: (0.02 * rng.standard_normal(tuple(v.shape), dtype=np.float32)).astype(np.float16)
             for k, v in shapes.items() if not k.endswith("position_ids")}
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    save_file(state, str(path))


def worker(model: str, backend: str) -> None:
    """One load in this process; prints seconds and peak RSS (MB) as JSON."""
    start = time.perf_counter()
    from mlx_stablefused import TextToImageDiffusion

    pipe = TextToImageDiffusion(model, backend=backend, dtype="float16", use_cache=False, progress=False)
    b = pipe.backend
    if backend == "mlx":
        import mlx.core as mx

        mx.eval([m.parameters() for m in (b.unet_model, b.vae, b.text_encoder)])
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--backend", default="mlx", choices=["mlx", "torch"])
    p.add_argument("--work", type=Path, default=Path("/tmp/mlx-stablefused-single-file-bench"))
    p.add_argument("--keep", action="store_true")
    p.add_argument("--worker", nargs=2, metavar=("MODEL", "BACKEND"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(*args.worker)
    args.work.mkdir(parents=True, exist_ok=True)
    file, folder = args.work / "sd15-random.safetensors", args.work / "sd15-random-mlx"
    try:
        if not file.is_file():
            write_checkpoint(file)
        if not folder.is_dir():
            from mlx_stablefused.cli import main as cli

            assert cli(["convert", str(file), str(folder), "--dtype", "float16"]) == 0
        runs: dict[str, list[dict]] = {"single file": [], "converted folder": []}
        for _ in range(args.rounds):
            for name, model in (("single file", file), ("converted folder", folder)):
                out = subprocess.run([sys.executable, __file__, "--worker", str(model), args.backend],
                                     capture_output=True, text=True, check=True, cwd=ROOT)
                runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{file.stat().st_size / 2**30:.2f} GB fp16 file, {args.backend} backend, {args.rounds} rounds (median):")
        median = {n: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "peak_rss_mb")} for n, rs in runs.items()}
        for name, m in median.items():
            ratio = {k: m[k] / median["converted folder"][k] for k in m}
            print(f"  {name:<17} {m['seconds']:7.2f} s ({ratio['seconds']:.2f}x)   "
                  f"{m['peak_rss_mb']:7.0f} MB ({ratio['peak_rss_mb']:.2f}x)")
        print(json.dumps(runs))
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
