"""UNet3DConditionModel (ModelScope text-to-video, Zeroscope) in MLX, built from its topology plan.

Every spatial layer is SD's, run per frame (frames in the batch, frame-minor); after each resnet a
temporal convolution, and after each spatial transformer a temporal transformer, mix the frames
(the plan puts them on the blocks unet.py shares).
"""

from __future__ import annotations

from ...config import UNet3DConfig
from ...topology import unet3d_plan
from .unet import ConditionalUNet


class UNet3DConditionModel(ConditionalUNet):
    def __init__(self, config: UNet3DConfig) -> None:
        super().__init__()
        self.config = config
        self.build(unet3d_plan(config))

    def frames(self, num_frames: int | None) -> int:
        """``sample`` is (B*F, h, w, C) frame-minor, context already repeated per frame; one frame if not given."""
        return num_frames or 1
