"""Tiled VAE decode and encode for images too large to process whole, as diffusers' AutoencoderKL tiling:
overlapping tiles, each run through the VAE alone, blended linearly over the overlap. Tiles are
cut and blended in numpy, so this works for every backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class TileSpec:
    sample_size: int  # tile side in pixels
    latent_size: int  # tile side in latent cells
    overlap: float = 0.25


def _blend_rows(a: np.ndarray, b: np.ndarray, extent: int) -> None:
    """Fade the top ``extent`` rows of ``b`` in from the bottom rows of ``a`` (NHWC, in place)."""
    extent = min(a.shape[1], b.shape[1], extent)
    for y in range(extent):
        w = y / extent
        b[:, y] = a[:, -extent + y] * (1 - w) + b[:, y] * w


def _blend_cols(a: np.ndarray, b: np.ndarray, extent: int) -> None:
    extent = min(a.shape[2], b.shape[2], extent)
    for x in range(extent):
        w = x / extent
        b[:, :, x] = a[:, :, -extent + x] * (1 - w) + b[:, :, x] * w


def _tiled(source: np.ndarray, run: Callable[[np.ndarray], np.ndarray], tile_in: int, tile_out: int,
           overlap: float) -> np.ndarray:
    """``source`` is NCHW; ``run`` maps an NCHW tile to an NHWC result; returns the blended NHWC result."""
    stride = int(tile_in * (1 - overlap))
    extent = int(tile_out * overlap)
    limit = tile_out - extent
    rows = [[run(source[:, :, i:i + tile_in, j:j + tile_in]) for j in range(0, source.shape[3], stride)]
            for i in range(0, source.shape[2], stride)]
    out_rows = []
    for i, row in enumerate(rows):
        cells = []
        for j, tile in enumerate(row):
            if i > 0:
                _blend_rows(rows[i - 1][j], tile, extent)
            if j > 0:
                _blend_cols(row[j - 1], tile, extent)
            cells.append(tile[:, :limit, :limit])
        out_rows.append(np.concatenate(cells, axis=2))
    return np.concatenate(out_rows, axis=1)


def tiled_decode(latent: np.ndarray, decode: Callable[[np.ndarray], np.ndarray], spec: TileSpec) -> np.ndarray:
    """NCHW unscaled latents -> NHWC images, decoding ``spec.latent_size`` tiles."""
    return _tiled(latent, decode, spec.latent_size, spec.sample_size, spec.overlap)


def tiled_encode(pixels: np.ndarray, encode: Callable[[np.ndarray], np.ndarray], spec: TileSpec) -> np.ndarray:
    """NCHW images -> NHWC posterior means, encoding ``spec.sample_size`` tiles."""
    return _tiled(pixels, encode, spec.sample_size, spec.latent_size, spec.overlap)
