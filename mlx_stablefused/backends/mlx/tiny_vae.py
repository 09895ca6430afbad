"""AutoencoderTiny (TAESD) in MLX, built from its topology plan (mlx_stablefused.topology). Tensors are NHWC.

On MLX's CPU build the decoder runs large maps as row bands on one CPU stream per core, as the VAE does
(each 3x3 convolution borrows one row from each neighbouring band; ReLU and nearest upsampling are
row-local), so a preview uses every core; the result is the same convolution, row for row."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ...config import AutoencoderTinyConfig
from ...topology import TinyLayer, tiny_autoencoder_plan
from .cpu_streams import StreamSet, split_axis
from .layers import StripConv2d, on_bands, resize_nearest
from .vae import band_streams


def conv3x3(c_in: int, c_out: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    if stride == 1:
        return StripConv2d(c_in, c_out, 3, padding=1, bias=bias)
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)


class ReLU(nn.ReLU):
    def over_bands(self, bands: list[mx.array], streams: list[mx.Stream]) -> list[mx.array]:
        return on_bands(nn.relu, streams, bands)


class AutoencoderTinyBlock(nn.Module):
    """Three 3x3 convolutions with ReLU between, plus the input (identity skip), then ReLU (diffusers' ``fuse``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = [conv3x3(channels, channels), ReLU(), conv3x3(channels, channels), ReLU(),
                     conv3x3(channels, channels)]

    def __call__(self, x: mx.array) -> mx.array:
        y = x
        for layer in self.conv:
            y = layer(y)
        return nn.relu(y + x)

    def over_bands(self, bands: list[mx.array], streams: list[mx.Stream]) -> list[mx.array]:
        ys = bands
        for layer in self.conv:
            ys = layer.over_bands(ys, streams)
        return on_bands(lambda y, x: nn.relu(y + x), streams, ys, bands)


class Upsample(nn.Module):
    def __init__(self, scale: int) -> None:
        super().__init__()
        self.scale = scale

    def __call__(self, x: mx.array) -> mx.array:
        return resize_nearest(x, (x.shape[1] * self.scale, x.shape[2] * self.scale))

    def over_bands(self, bands: list[mx.array], streams: list[mx.Stream]) -> list[mx.array]:
        return on_bands(self, streams, bands)


def build_layer(layer: TinyLayer) -> nn.Module:
    if layer.kind == "conv":
        return conv3x3(layer.in_channels, layer.out_channels, layer.stride, layer.bias)
    if layer.kind == "block":
        return AutoencoderTinyBlock(layer.out_channels)
    if layer.kind == "relu":
        return ReLU()
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

    def over_bands(self, bands: list[mx.array], streams: list[mx.Stream]) -> list[mx.array]:
        """Every layer on row bands (3x3 stride-1 convolutions, ReLU, upsampling: the decoder's kinds)."""
        for layer in self.layers:
            bands = layer.over_bands(bands, streams)
            if isinstance(layer, Upsample):
                mx.eval(bands)  # one stage's activations alive at a time
        return bands


class AutoencoderTiny(nn.Module):
    """TAESD: ``decode`` unscaled latents -> images in [-1, 1]; ``encode`` images in [-1, 1] -> latents.
    Inputs are cast to the weights' dtype, outputs are float32."""

    def __init__(self, config: AutoencoderTinyConfig) -> None:
        super().__init__()
        plan = tiny_autoencoder_plan(config)
        self.encoder = LayerStack(plan.encoder)
        self.decoder = LayerStack(plan.decoder)
        self.stream_set: StreamSet | None = None

    def set_stream_set(self, stream_set: StreamSet | None) -> None:
        """Run the decoder on row bands over these CPU streams (None: one stream)."""
        self.stream_set = stream_set

    def decode(self, z: mx.array) -> mx.array:
        dtype = self.decoder.layers[0].weight.dtype
        z = mx.tanh(z.astype(dtype) / 3) * 3  # diffusers' DecoderTiny clamp
        streams = band_streams(self.stream_set, z.shape[1])
        if len(streams) < 2:
            x = self.decoder(z)
        else:
            with self.stream_set.sharing_cores(len(streams)):
                x = mx.concatenate(self.decoder.over_bands(split_axis(z, len(streams), axis=1), streams), axis=1)
                mx.eval(x)
        return (x * 2 - 1).astype(mx.float32)

    def encode(self, images: mx.array) -> mx.array:
        dtype = self.encoder.layers[0].weight.dtype
        return self.encoder((images.astype(dtype) + 1) / 2).astype(mx.float32)
