"""A rank's window of a batch carries its own part of every per-item conditioning: ControlNet images (in both
guidance halves) and IP-Adapter image tokens. Each rank's items, computed on a simulated 2-rank launch, equal
those items of one process's batch, so splitting never pairs an image with another image's control."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import max_abs_error, report
from test_controlnet import controlnets, with_controlnets  # noqa: F401  (the module fixture)
from tiny_controlnets import control_image

from mlx_stablefused import TextToImageDiffusion
from mlx_stablefused.distributed import Group
from mlx_stablefused.pipelines import data_parallel
from mlx_stablefused.pipelines.data_parallel import Shard


class MirrorGroup(Group):
    """Rank ``rank`` of two whose peer answers every exchange with this rank's own bytes: the start-up checks
    pass, and the gathered batch holds this rank's items in their places (the peer's places: copies)."""

    engine = "mirror"

    def __init__(self, rank: int) -> None:
        self.rank, self.size, self.sequence = rank, 2, 0

    def _all_gather(self, array: np.ndarray) -> np.ndarray:
        return np.stack([array, array])


@pytest.mark.slow  # ~10 s: four 3-image runs with two ControlNets
def test_each_rank_gets_its_items_control_images(sd1, controlnets, pipelines, monkeypatch):  # noqa: F811
    pipe = with_controlnets(pipelines.pipeline(TextToImageDiffusion, sd1[1], "mlx"), controlnets, ["sd1-a", "sd1-b"])
    prompts = ["a red boat", "a blue door", "a green hill"]
    per_prompt = [[control_image(seed=k + 3 * n) for k in range(3)] for n in range(2)]  # per ControlNet, per prompt
    call = dict(prompt=prompts, num_inference_steps=2, guidance_scale=6.0, seed=5, output_type="np",
                control_image=per_prompt, controlnet_conditioning_scale=[0.7, 1.2])
    whole = pipe(**call)
    monkeypatch.setattr(data_parallel, "launcher", lambda: "torchrun")
    worst = 0.0
    for rank in (0, 1):
        monkeypatch.setattr(data_parallel, "current_group", lambda rank=rank: MirrorGroup(rank))
        split = pipe(**call)
        own = Shard(len(prompts), rank, 2).own
        assert len(own) > 0
        worst = max(worst, max_abs_error(split[own.start:own.stop], whole[own.start:own.stop]))
    assert report("ControlNet batch split over 2 simulated ranks vs one process (max abs)", worst) < 1e-5
    # The control images do steer: the same call with the images of the first prompt for all differs.
    same = pipe(**{**call, "control_image": [[images[0]] * 3 for images in per_prompt]})
    assert max_abs_error(same[1:], whole[1:]) > 1e-3
