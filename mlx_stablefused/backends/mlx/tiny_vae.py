"""AutoencoderTiny (TAESD) in MLX, built from its topology plan (mlx_stablefused.topology). Tensors are NHWC."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ...config import AutoencoderTinyConfig
from ...topology import TinyLayer, tiny_autoencoder_plan
from .layers import resize_nearest


def conv3x3(c_in: int, c_out: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)


class AutoencoderTinyBlock(nn.Module):
    """Three 3x3 convolutions with ReLU between, plus the input (identity skip), then ReLU (diffusers' ``fuse``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = [conv3x3(channels, channels), nn.ReLU(), conv3x3(channels, channels), nn.ReLU(),
                     conv3x3(channels, channels)]

    def __call__(self, x: mx.array) -> mx.array:
        y = x
        for layer in self.conv:
            y = layer(y)
        return nn.relu(y + x)


class Upsample(nn.Module):
    def __init__(self, scale: int) -> None:
        super().__init__()
        self.scale = scale

    def __call__(self, x: mx.array) -> mx.array:
        return resize_nearest(x, (x.shape[1] * self.scale, x.shape[2] * self.scale))


def build_layer(layer: TinyLayer) -> nn.Module:
    if layer.kind == "conv":
        return conv3x3(layer.in_channels, layer.out_channels, layer.stride, layer.bias)
    if layer.kind == "block":
        return AutoencoderTinyBlock(layer.out_channels)
    if layer.kind == "relu":
        return nn.ReLU()
    return Upsample(layer.scale)


class LayerStack(nn.Module):
    """diffusers' EncoderTiny / DecoderTiny: one ``layers`` list, parameters named by position."""

    def __init__(self, layers: tuple[TinyLayer, ...]) -> None:
        super().__init__()
        self.layers = [build_layer(layer) for layer in layers]

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.layers:
            x = layer(x)
        return x


class AutoencoderTiny(nn.Module):
    """TAESD: ``decode`` unscaled latents -> images in [-1, 1]; ``encode`` images in [-1, 1] -> latents.
    Inputs are cast to the weights' dtype, outputs are float32."""

    def __init__(self, config: AutoencoderTinyConfig) -> None:
        super().__init__()
        plan = tiny_autoencoder_plan(config)
        self.encoder = LayerStack(plan.encoder)
        self.decoder = LayerStack(plan.decoder)

    def decode(self, z: mx.array) -> mx.array:
        dtype = self.decoder.layers[0].weight.dtype
        z = mx.tanh(z.astype(dtype) / 3) * 3  # diffusers' DecoderTiny clamp
        return (self.decoder(z) * 2 - 1).astype(mx.float32)

    def encode(self, images: mx.array) -> mx.array:
        dtype = self.encoder.layers[0].weight.dtype
        return self.encoder((images.astype(dtype) + 1) / 2).astype(mx.float32)
