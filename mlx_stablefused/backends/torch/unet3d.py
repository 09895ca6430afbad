"""UNet3DConditionModel (ModelScope, Zeroscope) in PyTorch, built from its topology plan (as backends/mlx/unet3d.py)."""

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
        return num_frames or 1
