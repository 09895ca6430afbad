"""One rank of a 2-rank launch in test_distributed.py (run by mlx.launch or torchrun): build the pipeline,
run one scenario on the demo model, save what this rank returned. The test runs the same scenario in one
process (``distributed=False``) and compares.

    python tests/distributed_worker.py SCENARIO[,SCENARIO...] OUT_DIR [BACKEND]

Each scenario's result goes to OUT_DIR/SCENARIO-rankR.npy; "killed" and "mismatch" end in an error instead
("killed" would write OUT_DIR/killed.png through the CLI's writer).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

SIZE = dict(image_height=32, image_width=32)


def pipeline(scenario: str, backend: str, distributed: bool = True):
    from mlx_stablefused import ImageToImageDiffusion, InpaintDiffusion, LatentWalkDiffusion, TextToImageDiffusion, TextToVideoDiffusion

    if scenario in ("windows", "videos"):
        pipe = TextToVideoDiffusion("demo:tiny-random", motion_adapter="demo:motion", backend=backend, progress=False,
                                    distributed=distributed)
        if scenario == "windows":
            pipe.enable_context_windows(length=4, stride=2)
        return pipe
    cls = {"interpolate": LatentWalkDiffusion, "interpolate_ancestral": LatentWalkDiffusion, "walk": LatentWalkDiffusion,
           "img2img": ImageToImageDiffusion, "inpaint": InpaintDiffusion}.get(scenario, TextToImageDiffusion)
    pipe = cls("demo:tiny-random", backend=backend, progress=False, distributed=distributed,
               guidance_parallel=distributed and scenario == "guidance_parallel")
    if scenario in ("batch", "interpolate_ancestral", "img2img", "inpaint"):
        pipe.set_scheduler("euler_ancestral")  # every step draws noise: the ranks must draw it as one process
    return pipe


def run(scenario: str, pipe, pause_at_step: int | None = None) -> np.ndarray:
    from mlx_stablefused.pipelines.data_parallel import guidance_sweep

    common = dict(num_inference_steps=3, output_type="np", seed=5)
    if scenario.startswith("interpolate"):  # 7 frames in batches of 3: the last batch has 1 frame for 2 ranks
        return pipe.interpolate(["a red cube", "a blue ball", "a green tree"], interpolation_steps=3, batch_size=3,
                                **SIZE, **common)
    if scenario == "batch":
        return pipe(["a cat", "a dog", "a cow"], num_images_per_prompt=2, negative_prompt="blurry", **SIZE, **common)
    if scenario == "sweep":
        return np.stack(guidance_sweep(pipe, [1.0, 4.0, 7.5], prompt="a lighthouse", **SIZE, **common))
    if scenario == "guidance_parallel":
        return pipe("a lighthouse", **SIZE, **common)
    if scenario == "walk":  # three latents, each walked: split 2 + 1
        latent = np.random.default_rng(1).standard_normal((3, 4, 4, 4)).astype(np.float32)
        return pipe(["a cat", "a dog", "a cow"], latent, strength=0.3, **common)
    if scenario == "img2img":
        image = np.random.default_rng(2).random((2, 32, 32, 3)).astype(np.float32)
        return pipe(image, ["a cat", "a dog"], num_images_per_prompt=2, strength=0.7, **common)
    if scenario == "inpaint":  # latent blending: the known region of each window's own images
        image = np.random.default_rng(2).random((3, 32, 32, 3)).astype(np.float32)
        mask = np.zeros((32, 32), np.float32)
        mask[8:24, 4:20] = 1.0
        return pipe(["a cat", "a dog", "a cow"], image, mask, strength=0.8, **common)
    if scenario == "videos":  # no context windows: the videos are split
        return pipe("a walk", video_height=32, video_width=32, video_frames=4, num_inference_steps=2,
                    num_videos_per_prompt=3, output_type="np", seed=5)
    if scenario == "windows":
        return pipe("a walk", video_height=32, video_width=32, video_frames=8, num_inference_steps=2,
                    output_type="np", seed=5)
    if scenario == "killed":  # rank 1 dies in the middle of its denoising; rank 0 must fail, not hang
        def die(pipe, step, timestep, tensors):
            if step == 1 and rank() == 1:
                os._exit(9)
        return pipe(["a cat", "a dog"], callback_on_step_end=die, **SIZE, **common)
    if scenario == "mismatch":  # the ranks ask for different images: refused on every rank before any work
        return pipe(f"a cat on rank {rank()}", **SIZE, **common)
    raise SystemExit(f"unknown scenario {scenario!r}")


def rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("MLX_RANK", "0")))


def main() -> None:
    scenarios, out, backend = sys.argv[1].split(","), Path(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "mlx"
    from mlx_stablefused.cli import save_images
    from mlx_stablefused.utils.images import numpy_to_pil

    for scenario in scenarios:
        result = run(scenario, pipeline(scenario, backend))
        if scenario == "killed":
            save_images(numpy_to_pil(result), str(out / "killed.png"))
        np.save(out / f"{scenario}-rank{rank()}.npy", result)


if __name__ == "__main__":
    main()
