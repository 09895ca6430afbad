"""Side-by-side speed and memory: diffusers vs mlx-stablefused (MLX and torch backends), same weights, same work.

Each measured run is a fresh worker process (so its peak RSS is its own); implementations alternate
run by run so machine drift hits all of them alike. Default work: the full SD 1.5 architecture with
random weights (built once, cached), 256x256, 4 DDIM steps, classifier-free guidance, batch 1, fp32.

    python benchmarks/benchmark_sd.py                     # default work, 3 rounds
    python benchmarks/benchmark_sd.py --size 512 --steps 20 --dtype float16 --device cuda --json out.json
    python benchmarks/benchmark_sd.py --model /path/to/diffusers/sd15   # real weights instead
    python benchmarks/benchmark_sd.py --frames 16 --size 128 --steps 2  # AnimateDiff: 16 frames, random adapter
    python benchmarks/benchmark_sd.py --controlnet default   # + a random SD 1.5 ControlNet (StableDiffusionControlNetPipeline)
    python benchmarks/benchmark_sd.py --model sdxl --size 512 --steps 2 --rounds 1 --impl mlx --single-run \
        --append --json benchmarks/results-sdxl-cpu-2core.json   # SDXL vs StableDiffusionXLPipeline, one side a call
    python benchmarks/benchmark_sd.py --architecture sd21 --scheduler euler --impl diffusers mlx diffuse-mlx
        # SD 2.1-base (random, built once) against diffuse-mlx, PyPI's package of mlx-examples' stable_diffusion
    python benchmarks/benchmark_sd.py --architecture sd21 --agreement   # one UNet evaluation, same inputs, compared

Prints seconds per step, end-to-end seconds, peak process RSS and (MLX) mx.get_peak_memory, and the
ratios against diffusers; writes all numbers as JSON with --json. Timings never enter the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPLEMENTATIONS = ("diffusers", "mlx", "torch", "diffuse-mlx")
DEFAULT_IMPLEMENTATIONS = ("diffusers", "mlx", "torch")
ARCHITECTURES = {"sd15": "bench-sd15-random", "sd21": "bench-sd21-random"}  # --architecture: the random model's folder
# diffuse-mlx (mlx-examples' stable_diffusion) loads only hub ids it knows; this one is SD 2.1-base.
DIFFUSE_MLX_REPO = "stabilityai/stable-diffusion-2-1-base"


def default_model_dir(architecture: str = "sd15") -> Path:
    base = Path(os.environ.get("MLX_STABLEFUSED_CACHE", Path.home() / ".cache" / "mlx-stablefused"))
    return base / ARCHITECTURES[architecture]


def diffuse_mlx_hub_cache(model: Path) -> Path:
    """A Hugging Face hub cache (HF_HUB_CACHE, next to ``model``) in which DIFFUSE_MLX_REPO's files are links
    into the diffusers folder ``model``: with HF_HUB_OFFLINE=1, diffuse-mlx's own hf_hub_download finds them there.
    """
    import hashlib

    model = Path(model).resolve()
    commit = hashlib.sha1(str(model).encode()).hexdigest()  # any 40-hex name; refs/main points at it
    repo = model.parent / f"{model.name}-hub" / f"models--{DIFFUSE_MLX_REPO.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for file in model.rglob("*"):
        link = snapshot / file.relative_to(model)
        if file.is_file() and not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(file)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return repo.parent


def pipeline_class(model: str | Path) -> str:
    """The diffusers pipeline a model folder names (``model_index.json``'s ``_class_name``)."""
    index = Path(model) / "model_index.json"
    return json.loads(index.read_text()).get("_class_name", "StableDiffusionPipeline") if index.is_file() else \
        "StableDiffusionPipeline"


def build_random_sd15(folder: Path) -> None:
    """The SD 1.5 architecture (diffusers' default configs) with random weights, as a diffusers folder."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    sys.path.insert(0, str(ROOT))
    from mlx_stablefused.checkpoint_io import atomic_directory
    from mlx_stablefused.demo import write_byte_level_tokenizer

    torch.manual_seed(0)
    with atomic_directory(folder, overwrite=True) as tmp:
        vocab = write_byte_level_tokenizer(tmp / "_tok")
        tokenizer = CLIPTokenizer.from_pretrained(str(tmp / "_tok"))
        text = CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12,
                                            max_position_embeddings=77, hidden_act="quick_gelu",
                                            eos_token_id=vocab - 1, bos_token_id=vocab - 2))
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            sample_size=512)
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(str(tmp), safe_serialization=True)


def default_adapter_dir() -> Path:
    return default_model_dir().parent / "bench-motion-adapter-random"


def build_random_motion_adapter(folder: Path) -> None:
    """AnimateDiff's v1-5-2 adapter architecture (diffusers' MotionAdapter defaults) with random weights.

    diffusers zero-initialises each motion module's proj_out (the module starts as the identity); the
    benchmark gives it small random weights so the motion modules change the result, as trained ones do.
    """
    import torch
    from diffusers import MotionAdapter

    sys.path.insert(0, str(ROOT))
    from mlx_stablefused.checkpoint_io import atomic_directory

    torch.manual_seed(1)
    adapter = MotionAdapter()  # (320, 640, 1280, 1280), 2 layers per block, 8 heads, 32 positions, mid block
    with torch.no_grad():
        for name, param in adapter.named_parameters():
            if ".proj_out." in name:
                param.normal_(0.0, 0.02)
    with atomic_directory(folder, overwrite=True) as tmp:
        adapter.save_pretrained(str(tmp), safe_serialization=True)


def default_controlnet_dir() -> Path:
    return default_model_dir().parent / "bench-controlnet-sd15-random"


def build_random_controlnet(folder: Path, model: Path) -> None:
    """An SD 1.5 ControlNet (diffusers' ControlNetModel.from_unet on the benchmark UNet) with random weights; the
    zero convolutions get small random weights, so the residuals change the result, as trained ones do."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    sys.path.insert(0, str(ROOT))
    from mlx_stablefused.checkpoint_io import atomic_directory

    torch.manual_seed(2)
    net = ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(str(model), subfolder="unet"))
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                param.normal_(0.0, 0.02)
    with atomic_directory(folder, overwrite=True) as tmp:
        net.save_pretrained(str(tmp), safe_serialization=True)


def bench_control_image(size: int):
    """A fixed edge-map-like control image (white strokes on black)."""
    import numpy as np
    from PIL import Image

    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[size // 4: size // 4 + 2, :] = 255
    pixels[:, size // 3: size // 3 + 2] = 255
    pixels[size // 2:, size // 2: size // 2 + 2] = 255
    return Image.fromarray(pixels)


# ----------------------------------------------------------------------------------- worker side
def worker(impl: str, args: argparse.Namespace) -> dict:
    """One measured run in this (fresh) process: load, warm up, time, report."""
    import numpy as np

    prompt = "a photograph of an astronaut riding a horse"
    steps, size, batch, frames = args.steps, args.size, args.batch, args.frames
    shape = (batch, 4, size // 8, size // 8) if not frames else (batch, 4, frames, size // 8, size // 8)
    latents = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    t0 = time.perf_counter()
    streams = None
    if impl == "diffusers":
        import torch
        from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

        torch.set_num_threads(args.threads)
        sampler = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}[args.scheduler]  # text-to-image
        if args.fair_malloc:  # the glibc settings our torch backend uses, so allocator luck is not measured
            sys.path.insert(0, str(ROOT))
            from mlx_stablefused._malloc import keep_freed_memory

            keep_freed_memory()
        dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
        if frames:
            from diffusers import AnimateDiffPipeline, MotionAdapter

            sys.path.insert(0, str(ROOT))
            from mlx_stablefused.pipelines.text_to_video import ANIMATEDIFF_DDIM

            adapter = MotionAdapter.from_pretrained(args.motion_adapter, torch_dtype=dtype)
            pipe = AnimateDiffPipeline.from_pretrained(args.model, motion_adapter=adapter, torch_dtype=dtype,
                                                       safety_checker=None, feature_extractor=None).to(args.device)
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, **ANIMATEDIFF_DDIM)
            extra = {"num_frames": frames}
        elif args.controlnet:
            from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

            net = ControlNetModel.from_pretrained(args.controlnet, torch_dtype=dtype)
            pipe = StableDiffusionControlNetPipeline.from_pretrained(
                args.model, controlnet=net, torch_dtype=dtype, safety_checker=None,
                requires_safety_checker=False).to(args.device)
            pipe.scheduler = sampler.from_config(pipe.scheduler.config)
            extra = {"image": bench_control_image(size)}
        elif pipeline_class(args.model) == "StableDiffusionXLPipeline":
            from diffusers import StableDiffusionXLPipeline

            pipe = StableDiffusionXLPipeline.from_pretrained(args.model, torch_dtype=dtype,
                                                             add_watermarker=False).to(args.device)  # ours has none
            pipe.scheduler = sampler.from_config(pipe.scheduler.config)
            extra = {}
        else:
            pipe = StableDiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype, safety_checker=None,
                                                           requires_safety_checker=False).to(args.device)
            pipe.scheduler = sampler.from_config(pipe.scheduler.config)
            extra = {}
        pipe.set_progress_bar_config(disable=True)
        lat = torch.from_numpy(latents).to(args.device, dtype)

        def run(n, output_type="np", **callback):
            with torch.inference_mode():
                out = pipe([prompt] * batch, num_inference_steps=n, guidance_scale=7.5, latents=lat, height=size,
                           width=size, output_type=output_type, **extra, **callback)
            if args.device == "cuda":
                torch.cuda.synchronize()
            return out.frames if frames else out.images

        def decode():  # what the pipeline does after its last step (the VAE runs in its own dtype: fp32 here)
            with torch.inference_mode():
                image = pipe.vae.decode(lat / pipe.vae.config.scaling_factor, return_dict=False)[0]
                pipe.image_processor.postprocess(image, output_type="np")
            if args.device == "cuda":
                torch.cuda.synchronize()
    elif impl == "diffuse-mlx":
        sd, mx = load_diffuse_mlx(args)
        decode = None  # --single-run is refused for it (its loop has no step callbacks)

        def run(n):  # as mlx-examples' txt2image: evaluate each step, then decode
            x = None
            for x in sd.generate_latents(prompt, n_images=batch, num_steps=n, cfg_weight=7.5,
                                         latent_size=(size // 8, size // 8), seed=0):
                mx.eval(x)
            image = sd.decode(x)
            mx.eval(image)
            return np.asarray(image)
    else:
        kwargs = {}
        streams = None
        if impl == "torch":
            import torch  # before mlx_stablefused, whose import preloads OpenBLAS globally

            torch.set_num_threads(args.threads)
            kwargs["device"] = args.device
        sys.path.insert(0, str(ROOT))
        from mlx_stablefused import TextToImageDiffusion, TextToVideoDiffusion

        if frames:  # AnimateDiff's own sampler (DDIM on linear betas), as the diffusers run uses
            pipe = TextToVideoDiffusion(args.model, motion_adapter=args.motion_adapter, backend=impl,
                                        dtype=args.dtype, progress=False, **kwargs)
        else:
            if args.controlnet:
                kwargs["controlnet"] = args.controlnet
            pipe = TextToImageDiffusion(args.model, backend=impl, dtype=args.dtype, progress=False,
                                        scheduler=args.scheduler, **kwargs)
        extra = {"control_image": bench_control_image(size)} if args.controlnet else {}
        if args.low_memory:
            pipe.enable_low_memory()
        if args.compile and impl == "mlx":
            pipe.enable_compile()
        if impl == "mlx":
            streams = pipe.set_cpu_streams(args.cpu_streams)

        def run(n, output_type="np", **callback):
            return pipe([prompt] * batch, latent=latents, num_inference_steps=n, guidance_scale=7.5,
                        output_type=output_type, **extra, **callback)

        def decode():
            pipe.resolve_output(latent=latents, output_type="np")

        if args.single_run and impl == "mlx":  # weights read before the clock starts, as diffusers' are
            import mlx.core as mx

            mx.eval([m.parameters() for m in pipe.backend.components.values()])

    load_s = time.perf_counter() - t0
    if args.single_run:
        return {"impl": impl, "load_s": load_s, **timed_single_run(impl, run, decode, steps, args.phase),
                **process_stats(impl, args, streams)}
    run(1)  # warm-up: kernel selection, lazy weight materialisation, first-call overheads
    t1 = time.perf_counter()
    images = run(steps)
    total = time.perf_counter() - t1
    t2 = time.perf_counter()
    run(1)
    one_step_total = time.perf_counter() - t2
    per_step = (total - one_step_total) / max(steps - 1, 1)  # the step cost without text encoding and decoding
    return {"impl": impl, "load_s": load_s, "end_to_end_s": total, "per_step_s": per_step,
            "finite": bool(np.isfinite(np.asarray(images, dtype=np.float32)).all()), **process_stats(impl, args, streams)}


def timed_single_run(impl: str, run, decode, steps: int, phase: str = "all") -> dict:
    """One cold run (no warm-up; for work too long to repeat), timed at each step's end by a step callback.

    ``first_step_s``: from the call to the first step's end (text encoding and first-call overheads included);
    ``per_step_s``: the later steps' mean (the first step's time when there is one step); ``decode_s``: from the
    last step's end to the images (the VAE decode). ``phase`` "latent": the run stops at the latents (no decode);
    "decode": only the decode of the run's latent, timed alone (for work longer than one sitting: the two phases
    in two processes add up to the run)."""
    if phase == "decode":
        t1 = time.perf_counter()
        decode()
        took = time.perf_counter() - t1
        return {"end_to_end_s": took, "decode_s": took, "phase": phase, "load_average": os.getloadavg()[0]}
    marks: list[float] = []

    def mark(pipe, step, timestep, tensors):
        if impl == "mlx":  # MLX is lazy: the step's latents exist before its time is taken
            import mlx.core as mx

            mx.eval(tensors["latents"])
        marks.append(time.perf_counter())
        return {}

    t1 = time.perf_counter()
    run(steps, output_type="latent" if phase == "latent" else "np", callback_on_step_end=mark)
    end = time.perf_counter()
    first = marks[0] - t1
    per_step = (marks[-1] - marks[0]) / (len(marks) - 1) if len(marks) > 1 else first
    out = {"end_to_end_s": end - t1, "first_step_s": first, "per_step_s": per_step, "steps_timed": len(marks),
           "phase": phase, "load_average": os.getloadavg()[0]}
    return out if phase == "latent" else {**out, "decode_s": end - marks[-1]}


def process_stats(impl: str, args: argparse.Namespace, streams: object = None) -> dict:
    """Peak RSS, page faults and (MLX) the allocator peak, BLAS and streams of this worker process."""
    result = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "minor_page_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt}
    if impl in ("mlx", "diffuse-mlx"):
        import mlx.core as mx

        result["mlx_peak_mb"] = mx.get_peak_memory() / 2**20
        from mlx_stablefused import _blas

        result["blas"] = _blas.status
        if os.environ.get("OPENBLAS_CORETYPE"):  # it overrides OpenBLAS's own kernel choice (see _blas)
            result["openblas_coretype_env"] = os.environ["OPENBLAS_CORETYPE"]
    if impl == "mlx":
        result["cpu_streams"] = streams
    if impl != "diffusers" or args.fair_malloc:
        from mlx_stablefused import _malloc

        result["malloc"] = _malloc.status
    return result


def load_diffuse_mlx(args: argparse.Namespace):
    """diffuse-mlx's StableDiffusion on the benchmark folder (through the hub cache run_worker points it at),
    with the same OpenBLAS and (--fair-malloc) glibc settings as our MLX backend; weights evaluated."""
    sys.path.insert(0, str(ROOT))
    from mlx_stablefused._blas import preload_openblas

    preload_openblas()  # before mlx.core is imported, as our MLX backend does
    if args.fair_malloc:
        from mlx_stablefused._malloc import keep_freed_memory

        keep_freed_memory()
    import mlx.core as mx
    from diffuse_mlx.stable_diffusion import StableDiffusion

    sd = StableDiffusion(DIFFUSE_MLX_REPO, float16=args.dtype == "float16")  # its VAE stays float32
    sd.ensure_models_are_loaded()
    return sd, mx


def unet_prediction(impl: str, args: argparse.Namespace) -> "np.ndarray":
    """One UNet evaluation on fixed inputs (latent, timestep 500, random text states of 77 tokens), (B, 4, h, w):
    whether two implementations do the same work, whatever their samplers and prompt handling."""
    import numpy as np

    rng = np.random.default_rng(0)
    latent = rng.standard_normal((1, 4, args.size // 8, args.size // 8)).astype(np.float32)
    width = json.loads((Path(args.model) / "unet" / "config.json").read_text())["cross_attention_dim"]
    context = rng.standard_normal((1, 77, width)).astype(np.float32)
    if impl == "diffusers":
        import torch
        from diffusers import UNet2DConditionModel

        torch.set_num_threads(args.threads)
        unet = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet")
        with torch.inference_mode():
            return unet(torch.from_numpy(latent), 500, encoder_hidden_states=torch.from_numpy(context)).sample.numpy()
    if impl == "diffuse-mlx":
        sd, mx = load_diffuse_mlx(args)
        out = sd.unet(mx.array(latent.transpose(0, 2, 3, 1)), mx.array([500.0]), encoder_x=mx.array(context))
        return np.asarray(out).transpose(0, 3, 1, 2)
    sys.path.insert(0, str(ROOT))
    from mlx_stablefused import TextToImageDiffusion

    pipe = TextToImageDiffusion(args.model, backend=impl, dtype=args.dtype, progress=False)
    backend = pipe.backend
    prediction = backend.unet(backend.latent_from_numpy(latent), 500.0, backend.from_numpy(context))
    return backend.latent_to_numpy(prediction)


# ------------------------------------------------------------------------------ orchestrator side
def run_worker(impl: str, args: argparse.Namespace, prediction_file: Path | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--model", str(args.model), "--size", str(args.size),
           "--steps", str(args.steps), "--batch", str(args.batch), "--dtype", args.dtype, "--device", args.device,
           "--threads", str(args.threads), "--scheduler", args.scheduler, "--architecture", args.architecture] + \
        (["--prediction-file", str(prediction_file)] if prediction_file else []) + \
        (["--low-memory"] if args.low_memory else []) + \
        (["--compile"] if args.compile else []) + \
        (["--cpu-streams", str(args.cpu_streams)] if args.cpu_streams is not None else []) + \
        (["--fair-malloc"] if args.fair_malloc else []) + \
        (["--frames", str(args.frames), "--motion-adapter", str(args.motion_adapter)] if args.frames else []) + \
        (["--controlnet", str(args.controlnet)] if args.controlnet else []) + \
        (["--single-run", "--phase", args.phase] if args.single_run else [])
    env = dict(os.environ)
    if args.no_openblas:
        env["MLX_STABLEFUSED_NO_OPENBLAS"] = "1"
    if impl == "diffuse-mlx":  # its own loader, offline, from a hub cache of links to the benchmark folder
        env.update(HF_HUB_CACHE=str(diffuse_mlx_hub_cache(Path(args.model))), HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} run failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(results: dict[str, list[dict]]) -> dict[str, dict]:
    out = {}
    for impl, runs in results.items():
        keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        out[impl] = {k: statistics.median(r[k] for r in runs) for k in keys}
        out[impl].update({k: v for k, v in runs[0].items() if isinstance(v, str)})
        out[impl].update({k: all(r[k] for r in runs) for k, v in runs[0].items() if isinstance(v, bool)})
    base = out.get("diffusers")
    if base:
        for impl, row in out.items():
            for k in ("per_step_s", "end_to_end_s", "peak_rss_mb", "first_step_s", "decode_s"):
                if k in row and k in base:
                    row[f"{k}_ratio"] = row[k] / base[k]
    return out


def agreement(args: argparse.Namespace) -> dict[str, dict]:
    """One UNet evaluation per implementation (fresh processes, same inputs), each against the first one's."""
    import tempfile

    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        outputs = {}
        for impl in args.impl:
            run_worker(impl, args, Path(tmp) / f"{impl}.npy")
            outputs[impl] = np.load(Path(tmp) / f"{impl}.npy")
    reference = outputs[args.impl[0]]
    return {impl: {"reference": args.impl[0], "finite": bool(np.isfinite(out).all()),
                   "max_abs": float(np.abs(out).max()), "max_abs_diff": float(np.abs(out - reference).max()),
                   "mean_abs_diff": float(np.abs(out - reference).mean())} for impl, out in outputs.items()}


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (argparse names the flag when it is not)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="diffusers SD or SDXL folder (default: random SD 1.5, built once; "
                                                 "'sdxl': the random full SDXL of random_models.py, built once)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default="cpu", help="torch device for diffusers and the torch backend")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--rounds", type=positive_int, default=3)
    p.add_argument("--impl", nargs="+", default=list(DEFAULT_IMPLEMENTATIONS), choices=IMPLEMENTATIONS,
                   help="diffuse-mlx: PyPI's package of mlx-examples' stable_diffusion (SD 2.1-base; pip install diffuse-mlx)")
    p.add_argument("--architecture", default="sd15", choices=sorted(ARCHITECTURES),
                   help="the random model built (once) when --model is not given")
    p.add_argument("--scheduler", default="ddim", choices=["ddim", "euler"],
                   help="text-to-image sampler on our side and diffusers' (diffuse-mlx always runs its own Euler)")
    p.add_argument("--agreement", action="store_true",
                   help="instead of timing: one UNet evaluation per --impl on the same inputs, compared")
    p.add_argument("--no-openblas", action="store_true", help="MLX with its bundled reference BLAS")
    p.add_argument("--low-memory", action="store_true", help="ours: the low-memory preset (enable_low_memory(): text encoder freed, attention and VAE slicing)")
    p.add_argument("--compile", action="store_true", help="MLX: mx.compile the UNet step")
    p.add_argument("--cpu-streams", type=int, default=None,
                   help="MLX on a CPU: streams run in parallel (default one per core; 1 = a single stream)")
    p.add_argument("--fair-malloc", action="store_true",
                   help="diffusers too runs with the torch backend's glibc thresholds (see mlx_stablefused/_malloc.py)")
    p.add_argument("--frames", type=int, default=0,
                   help="AnimateDiff text-to-video with this many frames (e.g. 16) instead of text-to-image")
    p.add_argument("--motion-adapter", default=None,
                   help="with --frames: a diffusers MotionAdapter folder (default: random v1-5-2 shape, built once)")
    p.add_argument("--controlnet", default=None,
                   help="text-to-image with this ControlNet folder ('default': a random SD 1.5 ControlNet, built once)")
    p.add_argument("--single-run", action="store_true",
                   help="one cold run per implementation, timed by step callbacks (no warm-up: for SDXL at 1024)")
    p.add_argument("--phase", default="all", choices=("all", "latent", "decode"),
                   help="with --single-run: the run up to the latents only, or only the decode of its latent")
    p.add_argument("--append", action="store_true",
                   help="merge these runs into the --json file's runs of the same work (one implementation per "
                        "invocation), and summarise them all")
    p.add_argument("--json", default=None, help="write the numbers here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--prediction-file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if "diffuse-mlx" in args.impl and not args.worker:
        import importlib.util

        if importlib.util.find_spec("diffuse_mlx") is None:
            p.error("--impl diffuse-mlx: the package is not installed (pip install -e \".[bench]\")")
    if args.worker:
        if args.prediction_file:
            import numpy as np

            np.save(args.prediction_file, unet_prediction(args.worker, args))
            print(json.dumps({}))
        else:
            print(json.dumps(worker(args.worker, args)))
        return
    if args.single_run and "diffuse-mlx" in args.impl:
        p.error("--single-run times steps by our and diffusers' step callbacks; diffuse-mlx has none")
    if args.model == "sdxl":
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import random_models

        args.model = default_model_dir().with_name("bench-sdxl-random")
        if not (args.model / "model_index.json").is_file():
            print(f"building the random SDXL model in {args.model} (once) ...", file=sys.stderr)
            random_models.build_sdxl(args.model)
    if args.model is None:
        args.model = default_model_dir(args.architecture)
        if not (Path(args.model) / "model_index.json").is_file():
            print(f"building the random {args.architecture} model in {args.model} (once) ...", file=sys.stderr)
            if args.architecture == "sd21":
                sys.path.insert(0, str(Path(__file__).parent))
                from random_models import build_sd21

                build_sd21(Path(args.model))
            else:
                build_random_sd15(Path(args.model))
    if args.agreement:
        found = agreement(args)
        print(json.dumps(found, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps({"work": f"one UNet evaluation, {args.architecture} "
                                                           f"{args.size}x{args.size}, {args.dtype}",
                                                   "agreement": found}, indent=2))
        return
    if args.frames < 0:
        p.error("--frames must be 0 (images) or a positive frame count")
    if args.frames and args.motion_adapter is None:
        args.motion_adapter = default_adapter_dir()
        if not (Path(args.motion_adapter) / "config.json").is_file():
            print(f"building the random motion adapter in {args.motion_adapter} (once) ...", file=sys.stderr)
            build_random_motion_adapter(Path(args.motion_adapter))
    if args.controlnet == "default":
        args.controlnet = default_controlnet_dir()
        if not (Path(args.controlnet) / "config.json").is_file():
            print(f"building the random SD 1.5 ControlNet in {args.controlnet} (once) ...", file=sys.stderr)
            build_random_controlnet(Path(args.controlnet), Path(args.model))
    results: dict[str, list[dict]] = {impl: [] for impl in args.impl}
    for r in range(args.rounds):
        for impl in args.impl:
            results[impl].append(run_worker(impl, args))
            last = results[impl][-1]
            print(f"round {r + 1}: {impl:11s} {last.get('per_step_s', float('nan')):.3f} s/step, "
                  f"{last['end_to_end_s']:.2f} s end to end", file=sys.stderr)
    family = "SDXL" if pipeline_class(args.model) == "StableDiffusionXLPipeline" else \
        {"sd15": "SD1.5", "sd21": "SD2.1-base"}[args.architecture]
    what = f"AnimateDiff {args.frames} frames" if args.frames else f"{family} + ControlNet" if args.controlnet else family
    sampler = "DDIM" if args.frames else {"ddim": "DDIM", "euler": "Euler"}[args.scheduler]
    work = f"{what} {args.size}x{args.size}, {args.steps} {sampler} steps, CFG, batch {args.batch}, {args.dtype}, " \
           f"device {args.device}" + (", one cold run" if args.single_run else "") + \
        {"all": "", "latent": ", to the latents", "decode": ", the decode alone"}[args.phase]
    if args.append and args.json and Path(args.json).is_file():
        earlier = json.loads(Path(args.json).read_text()).get("works", {}).get(work, {}).get("runs", {})
        results = {impl: earlier.get(impl, []) + results.get(impl, []) for impl in IMPLEMENTATIONS
                   if earlier.get(impl) or results.get(impl)}
    summary = summarise(results)
    print(f"\n{work} ({platform.machine()}, {os.cpu_count()} cores, {args.threads} threads); medians")
    print(f"{'impl':11s} {'s/step':>8s} {'x':>6s} {'e2e s':>8s} {'x':>6s} {'RSS MB':>8s} {'x':>6s} {'MLX MB':>8s}")
    for impl, row in summary.items():
        print(f"{impl:11s} {row.get('per_step_s', float('nan')):8.3f} {row.get('per_step_s_ratio', 1):6.2f} {row['end_to_end_s']:8.2f} "
              f"{row.get('end_to_end_s_ratio', 1):6.2f} {row['peak_rss_mb']:8.0f} {row.get('peak_rss_mb_ratio', 1):6.2f} "
              f"{row.get('mlx_peak_mb', float('nan')):8.0f}")
    if args.json and args.append:
        path = Path(args.json)
        data = json.loads(path.read_text()) if path.is_file() else {"works": {}}
        data["works"][work] = {"summary": summary, "runs": results}
        path.write_text(json.dumps(data, indent=2))
    elif args.json:
        Path(args.json).write_text(json.dumps({"work": work, "summary": summary, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
