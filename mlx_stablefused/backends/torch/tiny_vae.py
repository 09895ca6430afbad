"""AutoencoderTiny (TAESD) in PyTorch, built from its topology plan (mlx_stablefused.topology); NCHW."""

from __future__ import annotations

import torch
from torch import nn

from ...config import AutoencoderTinyConfig
from ...topology import TinyLayer, tiny_autoencoder_plan


def conv3x3(c_in: int, c_out: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)


class AutoencoderTinyBlock(nn.Module):
    """Three 3x3 convolutions with ReLU between, plus the input (identity skip), then ReLU (diffusers' ``fuse``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(conv3x3(channels, channels), nn.ReLU(), conv3x3(channels, channels), nn.ReLU(),
                                  conv3x3(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x) + x)


def build_layer(layer: TinyLayer) -> nn.Module:
    if layer.kind == "conv":
        return conv3x3(layer.in_channels, layer.out_channels, layer.stride, layer.bias)
    if layer.kind == "block":
        return AutoencoderTinyBlock(layer.out_channels)
    if layer.kind == "relu":
        return nn.ReLU()
    return nn.Upsample(scale_factor=layer.scale, mode="nearest")


class LayerStack(nn.Module):
    """diffusers' EncoderTiny / DecoderTiny: one ``layers`` Sequential, parameters named by position."""

    def __init__(self, layers: tuple[TinyLayer, ...]) -> None:
        super().__init__()
        self.layers = nn.Sequential(*(build_layer(layer) for layer in layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class AutoencoderTiny(nn.Module):
    """TAESD: ``decode`` unscaled latents -> images in [-1, 1]; ``encode`` images in [-1, 1] -> latents.
    Inputs are cast to the weights' dtype, outputs are float32."""

    def __init__(self, config: AutoencoderTinyConfig) -> None:
        super().__init__()
        plan = tiny_autoencoder_plan(config)
        self.encoder = LayerStack(plan.encoder)
        self.decoder = LayerStack(plan.decoder)

    @torch.inference_mode()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        weight = self.decoder.layers[0].weight
        z = torch.tanh(z.to(weight.dtype) / 3) * 3  # diffusers' DecoderTiny clamp
        return (self.decoder(z) * 2 - 1).float()

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        weight = self.encoder.layers[0].weight
        return self.encoder((images.to(weight.dtype) + 1) / 2).float()
