"""What a preview costs: one latent decoded by the full SD 1.5 VAE, by TAESD, and by the linear approximation,
on our MLX and torch backends (random weights of the real architectures; the cost does not depend on them).

    python benchmarks/benchmark_previews.py                       # 512x512, 3 rounds (VAE) / 10 (the others)
    python benchmarks/benchmark_previews.py --size 256 --json benchmarks/results-previews.json

The model folder holds the SD 1.5 VAE (diffusers' AutoencoderKL at SD 1.5's config) beside a tiny UNet and text
encoder (only the VAE is timed), and TAESD at diffusers' AutoencoderTiny defaults (TAESD's architecture). Prints
median seconds per image and the ratio to the VAE; timings never enter the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_folder(folder: Path) -> tuple[Path, Path]:
    """A diffusers SD folder (SD 1.5 VAE, tiny UNet and text encoder) and a TAESD folder, random weights."""
    import torch
    from diffusers import (AutoencoderKL, AutoencoderTiny, DDIMScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from mlx_stablefused.demo import write_byte_level_tokenizer

    model, taesd = folder / "model", folder / "taesd"
    if (model / "model_index.json").is_file() and (taesd / "config.json").is_file():
        return model, taesd
    torch.manual_seed(0)
    vocab = write_byte_level_tokenizer(folder / "_tok")
    text = CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, max_position_embeddings=77,
                                        eos_token_id=vocab - 1, bos_token_id=vocab - 2))
    unet = UNet2DConditionModel(block_out_channels=(32, 32), layers_per_block=1, cross_attention_dim=32,
                                attention_head_dim=2, norm_num_groups=8, sample_size=64,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=512)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=CLIPTokenizer.from_pretrained(
        str(folder / "_tok")), unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(str(model), safe_serialization=True)
    AutoencoderTiny().save_pretrained(str(taesd), safe_serialization=True)
    return model, taesd


def median_seconds(fn, rounds: int) -> tuple[float, list[float]]:
    fn()  # warm-up (kernels, allocator)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def measure(backend: str, model: Path, taesd: Path, size: int, rounds: int, cheap_rounds: int) -> dict:
    import numpy as np

    from mlx_stablefused import TextToImageDiffusion
    from mlx_stablefused.previews import latents_to_rgb
    from mlx_stablefused.tiny_autoencoder import tiny_decode

    pipe = TextToImageDiffusion(model, backend=backend, progress=False)
    pipe.load_tiny_autoencoder(taesd)
    latent = np.random.default_rng(0).standard_normal((1, 4, size // 8, size // 8)).astype(np.float32)
    native = pipe.backend.latent_from_numpy(latent)
    rows = {}
    rows["vae"] = median_seconds(lambda: pipe.latent_to_image(latent, "np"), rounds)
    rows["taesd"] = median_seconds(lambda: tiny_decode(pipe.backend, native), cheap_rounds)
    rows["linear"] = median_seconds(lambda: latents_to_rgb(latent, upscale=8), cheap_rounds)
    vae = rows["vae"][0]
    return {name: {"median_s": m, "runs_s": runs, "x_cheaper_than_vae": vae / m} for name, (m, runs) in rows.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3, help="timed VAE decodes (after one warm-up)")
    p.add_argument("--cheap-rounds", type=int, default=10, help="timed TAESD / linear decodes")
    p.add_argument("--backends", nargs="+", default=["mlx", "torch"])
    p.add_argument("--folder", type=Path, default=Path(os.environ.get(
        "MLX_STABLEFUSED_CACHE", Path.home() / ".cache" / "mlx-stablefused")) / "bench-previews")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    model, taesd = build_folder(args.folder)
    results = {b: measure(b, model, taesd, args.size, args.rounds, args.cheap_rounds) for b in args.backends}
    work = f"decode one {args.size}x{args.size} latent, float32, CPU: {cpu_model()}, {os.cpu_count()} cores"
    print(work)
    print(f"{'backend':8} {'decoder':8} {'median s':>10} {'x cheaper than the VAE':>24}")
    for b, rows in results.items():
        for name, r in rows.items():
            print(f"{b:8} {name:8} {r['median_s']:10.4f} {r['x_cheaper_than_vae']:24.1f}")
    if args.json:
        args.json.write_text(json.dumps({"work": work, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
