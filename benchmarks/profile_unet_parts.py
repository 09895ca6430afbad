"""Where a UNet step's time goes, ours vs diffuse-mlx: the same parts on the same shapes (the guidance batch of 2),
one MLX stream, fp32, the benchmark's random SD 2.1-base (MODEL= another folder). Prints seconds per part.

    python benchmarks/profile_unet_parts.py mlx 256
    HF_HUB_CACHE=~/.cache/mlx-stablefused/bench-sd21-random-hub HF_HUB_OFFLINE=1 \
        python benchmarks/profile_unet_parts.py diffuse-mlx 256   # the hub cache benchmark_sd.py makes
"""
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mlx_stablefused._blas import preload_openblas
from mlx_stablefused._malloc import keep_freed_memory
preload_openblas()  # before mlx.core, as the benchmark's workers
keep_freed_memory()
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402

impl, size = sys.argv[1], int(sys.argv[2])
model = Path(os.environ.get("MODEL", Path.home() / ".cache/mlx-stablefused/bench-sd21-random"))
cfg = json.loads((model / "unet" / "config.json").read_text())
ch, width = cfg["block_out_channels"][0], cfg["cross_attention_dim"]
rng = np.random.default_rng(0)
h = size // 8
lat = mx.array(rng.standard_normal((2, h, h, 4)).astype(np.float32))
ctx = mx.array(rng.standard_normal((2, 77, width)).astype(np.float32))
xtop = mx.array(rng.standard_normal((2, h, h, ch)).astype(np.float32))
tok = mx.array(rng.standard_normal((2, h * h, ch)).astype(np.float32))
temb = mx.array(rng.standard_normal((2, 4 * ch)).astype(np.float32))
t = mx.array([500.0, 500.0])

if impl == "diffuse-mlx":
    from diffuse_mlx.stable_diffusion.model_io import load_unet

    unet = load_unet("stabilityai/stable-diffusion-2-1-base")
    mx.eval(unet.parameters())
    blk = unet.down_blocks[0]
    ff = blk.attentions[0].transformer_blocks[0]  # a TransformerBlock: attention and GEGLU
    parts = {
        "unet": lambda: unet(lat, t, encoder_x=ctx),
        "transformer_top": lambda: blk.attentions[0](xtop, ctx, None, None),
        "self_attention_top": lambda: ff.attn1(tok, tok, tok, None),
        "feed_forward_top": lambda: ff.linear3(ff.linear1(tok) * nn.gelu(ff.linear2(tok))),  # its GEGLU
        "resnet_top": lambda: blk.resnets[0](xtop, temb),
    }
else:
    from mlx_stablefused import TextToImageDiffusion

    pipe = TextToImageDiffusion(str(model), backend="mlx", progress=False)
    unet = pipe.backend.unet_model
    mx.eval(unet.parameters())
    blk = unet.down_blocks[0]
    parts = {
        "unet": lambda: unet(lat, t, ctx),
        "transformer_top": lambda: blk.attentions[0](xtop, ctx),
        "self_attention_top": lambda: blk.attentions[0].transformer_blocks[0].attn1(tok),
        "feed_forward_top": lambda: blk.attentions[0].transformer_blocks[0].ff(tok),
        "resnet_top": lambda: blk.resnets[0](xtop, temb),
    }
found = {}
for name, fn in parts.items():
    reps = 1 if name == "unet" else 3
    mx.eval(fn())  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t0)
    found[name] = statistics.median(times)
    print(f"{impl} {size} {name}: {found[name]:.3f} s", flush=True)
print(json.dumps({"impl": impl, "size": size, "seconds": found}))
