"""One rank of a 2-rank launch in test_distributed.py (run by mlx.launch or torchrun): build the pipeline,
run one scenario on the demo model, save what this rank returned. The test runs the same scenario in one
process (``distributed=False``) and compares.

    python tests/distributed_worker.py SCENARIO OUT_DIR [BACKEND]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

SIZE = dict(image_height=32, image_width=32)


def pipeline(scenario: str, backend: str, distributed: bool = True):
    from mlx_stablefused import LatentWalkDiffusion, TextToImageDiffusion, TextToVideoDiffusion

    if scenario == "windows":
        pipe = TextToVideoDiffusion("demo:tiny-random", motion_adapter="demo:motion", backend=backend, progress=False,
                                    distributed=distributed)
        pipe.enable_context_windows(length=4, stride=2)
        return pipe
    cls = LatentWalkDiffusion if scenario.startswith("interpolate") else TextToImageDiffusion
    pipe = cls("demo:tiny-random", backend=backend, progress=False, distributed=distributed,
               guidance_parallel=distributed and scenario == "guidance_parallel")
    if scenario in ("batch", "interpolate_ancestral"):
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
    if scenario == "windows":
        return pipe("a walk", video_height=32, video_width=32, video_frames=8, num_inference_steps=2,
                    output_type="np", seed=5)
    if scenario == "killed":  # rank 1 dies in the middle of its denoising; rank 0 must fail, not hang
        def die(pipe, step, timestep, tensors):
            if step == 1 and int(os.environ.get("RANK", os.environ.get("MLX_RANK", "0"))) == 1:
                os._exit(9)
        return pipe(["a cat", "a dog"], callback_on_step_end=die, **SIZE, **common)
    raise SystemExit(f"unknown scenario {scenario!r}")


def main() -> None:
    scenario, out, backend = sys.argv[1], Path(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "mlx"
    from mlx_stablefused.distributed import current_group

    result = run(scenario, pipeline(scenario, backend))
    group = current_group()
    rank = 0 if group is None else group.rank
    np.save(out / f"rank{rank}.npy", result)


if __name__ == "__main__":
    main()
