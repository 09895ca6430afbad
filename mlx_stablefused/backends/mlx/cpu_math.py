"""Softmax attention and sigmoid-based activations in forms that MLX's CPU build runs fast.

On MLX's CPU build ``mx.exp`` (and with it ``mx.sigmoid``, ``nn.silu`` and the softmax inside
``mx.fast.scaled_dot_product_attention``) runs at about 40-60 M elements/s per core, while
``mx.power(2.0, x)`` runs at 160 M/s to the same float32 accuracy (relative error 8.6e-7 against a
float64 reference for both, measured on 8M normal samples). The attention softmax alone was a third
of a UNet step on the CPU (1.7 of 5.3 s per sample at 256x256). So on the CPU: attention scores are
taken in base 2 (the log2(e) factor folded into the query scale) and normalised after the product
with the values, and SiLU is ``x / (1 + 2^(-x log2 e))``. ``mx.erf`` is slower still (20-30 M/s):
GELU uses erfc from Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7, below float32's rounding
of the result: max abs error 4.7e-7 against float64 on 1.3M samples in [-15, 15], as nn.gelu's 4.65e-7)
at 1.8x the speed. On Metal and CUDA the fused kernels and MLX's own functions run.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

LOG2E = 1.4426950408889634
# Sliced attention on the CPU: the float32 score slice of a whole batch holds at most this many bytes, so a slice
# of N queries shrinks for large batches (16 video frames at 512x512 would hold 2 GB per 1024-query slice).
# Metal's fused kernel holds no score matrix.
CPU_SLICE_SCORE_BYTES = 128 * 2**20


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, query_chunk: int | None = None) -> mx.array:
    """softmax(q k^T * scale) v for (B, H, L, D) arrays, without a mask; ``query_chunk`` queries at a time
    (each query's softmax is its own, so chunks give the same numbers and cap the score matrix); on the CPU,
    fewer where the batch's score slice would pass ``CPU_SLICE_SCORE_BYTES``."""
    if query_chunk and on_cpu():
        query_chunk = min(query_chunk, max(1, CPU_SLICE_SCORE_BYTES // (q.shape[0] * q.shape[1] * k.shape[2] * 4)))
    if query_chunk and q.shape[2] > query_chunk:
        return mx.concatenate([attention(q[:, :, s:s + query_chunk], k, v, scale)
                               for s in range(0, q.shape[2], query_chunk)], axis=2)
    if not on_cpu():
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
    dtype = q.dtype
    if dtype != mx.float32:  # softmax statistics in float32, as the fused kernel keeps them
        q, k, v = q.astype(mx.float32), k.astype(mx.float32), v.astype(mx.float32)
    scores = (q * (scale * LOG2E)) @ k.swapaxes(-1, -2)
    weights = mx.power(2.0, scores - scores.max(axis=-1, keepdims=True))
    out = (weights @ v) / weights.sum(axis=-1, keepdims=True)
    return out if dtype == mx.float32 else out.astype(dtype)


def channel_sums(y: mx.array) -> mx.array:
    """Per-channel sums of (B, N, C) rows, (B, 1, C). On the CPU a product with a ones vector: BLAS's
    blocked sums are 4x faster than MLX's strided reduction there and closer to float64 (see GroupNorm)."""
    if on_cpu():
        return mx.ones((y.shape[0], 1, y.shape[1]), dtype=y.dtype) @ y
    return y.sum(axis=1, keepdims=True)


def sigmoid_scaled(x: mx.array, slope: float = 1.0) -> mx.array:
    """sigmoid(slope * x); base-2 form on the CPU."""
    if not on_cpu():
        return mx.sigmoid(x * slope if slope != 1.0 else x)
    return 1.0 / (1.0 + mx.power(2.0, x * (-slope * LOG2E)))


def silu(x: mx.array) -> mx.array:
    """x * sigmoid(x); ``x / (1 + 2^(-x log2 e))`` on the CPU (exact limits: -0 for x -> -inf, x for +inf)."""
    if not on_cpu():
        return nn.silu(x)
    return x / (1.0 + mx.power(2.0, x * -LOG2E))


# Abramowitz & Stegun 7.1.26: erfc(z) ~ t (a1 + t (a2 + t (a3 + t (a4 + t a5)))) exp(-z^2), t = 1 / (1 + p z)
_AS_P = 0.3275911
_AS_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def gelu(x: mx.array) -> mx.array:
    """Exact (erf) GELU, x * Phi(x); on the CPU through a rational erfc, without cancellation for x < 0."""
    if not on_cpu():
        return nn.gelu(x)
    z = mx.abs(x) * 0.7071067811865476
    t = 1.0 / (1.0 + _AS_P * z)
    a1, a2, a3, a4, a5 = _AS_A
    tail = t * (a1 + t * (a2 + t * (a3 + t * (a4 + t * a5)))) * mx.power(2.0, (z * z) * -LOG2E)  # erfc(|x|/sqrt2)
    return 0.5 * x * mx.where(x < 0, tail, 2.0 - tail)


class HalfLinearOnCPU(nn.Linear):
    """``nn.Linear`` whose float16/bfloat16 product runs as a float32 BLAS product on MLX's CPU build.

    MLX's CPU matmul has no half-precision BLAS: a float16 1024^3 product took 9.4 s where the float32
    one took 0.5 s (3 runs, OpenBLAS, this project's 2-core machine, shared), and a (2, 4096, 320) x
    (320, 1280) layer 32 s against 2.9 s upcast: fp16 weights on the CPU were unusable. Upcasting the operands (a transient float32 copy of the layer's
    weight and input) and rounding the result back gives the float32-accumulated product Metal's fp16
    kernels compute. Metal and CUDA run ``nn.Linear`` itself."""

    def __call__(self, x: mx.array) -> mx.array:
        if not on_cpu() or x.dtype != self.weight.dtype or x.dtype == mx.float32:
            return super().__call__(x)
        w = self.weight.astype(mx.float32).T
        if "bias" in self:
            y = mx.addmm(self.bias.astype(mx.float32), x.astype(mx.float32), w)
        else:
            y = x.astype(mx.float32) @ w
        return y.astype(x.dtype)


def half_linears_in_float32(module: nn.Module) -> None:
    """Make every plain ``nn.Linear`` of ``module`` a ``HalfLinearOnCPU`` (same parameters, same names)."""
    for _, m in module.named_modules():
        if type(m) is nn.Linear:
            m.__class__ = HalfLinearOnCPU


class QuantizedHalfLinearOnCPU(nn.QuantizedLinear):
    """``nn.QuantizedLinear`` whose float16/bfloat16 product runs with float32 activations on MLX's CPU build.

    MLX's CPU quantized kernel is slow for half-precision inputs: a (128, 320) x (320, 2560) 8-bit layer took
    3.8 s with float16 activations and 0.1 s with float32 ones (MLX 0.32.4, this project's 2-core machine,
    shared), so an 8-bit UNet step at 512x512 would have taken hours. Upcasting the input (the half-precision
    scales and biases promote with it) gives the float32 product with the dequantized weights, rounded back to
    the input's dtype, as ``HalfLinearOnCPU`` does for plain layers. Metal and CUDA run the layer itself."""

    def __call__(self, x: mx.array) -> mx.array:
        if not on_cpu() or x.dtype == mx.float32 or x.dtype != self.scales.dtype:
            return super().__call__(x)
        return super().__call__(x.astype(mx.float32)).astype(x.dtype)


def half_quantized_linears_in_float32(module: nn.Module) -> None:
    """Make every plain ``nn.QuantizedLinear`` of ``module`` a ``QuantizedHalfLinearOnCPU`` (same parameters)."""
    for _, m in module.named_modules():
        if type(m) is nn.QuantizedLinear:
            m.__class__ = QuantizedHalfLinearOnCPU

