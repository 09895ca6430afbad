"""Softmax attention and sigmoid-based activations in forms that MLX's CPU build runs fast.

On MLX's CPU build ``mx.exp`` (and with it ``mx.sigmoid``, ``nn.silu`` and the softmax inside
``mx.fast.scaled_dot_product_attention``) runs at about 40-60 M elements/s per core, while
``mx.power(2.0, x)`` runs at 160 M/s to the same float32 accuracy (relative error 8.6e-7 against a
float64 reference for both, measured on 8M normal samples). The attention softmax alone was a third
of a UNet step on the CPU (1.7 of 5.3 s per sample at 256x256). So on the CPU: attention scores are
taken in base 2 (the log2(e) factor folded into the query scale), exponentiated by one compiled kernel
(``exp2_nonpositive``) and normalised after the product with the values, in slices; SiLU is
``x / (1 + 2^(-x log2 e))``. ``mx.erf`` is slower still (20-30 M/s):
GELU uses erfc from Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7, below float32's rounding
of the result: max abs error 4.7e-7 against float64 on 1.3M samples in [-15, 15], as nn.gelu's 4.65e-7)
at 1.8x the speed. On Metal and CUDA the fused kernels and MLX's own functions run.
"""

from __future__ import annotations

import shutil
import sys

import mlx.core as mx
import mlx.nn as nn

from .cpu_streams import mark

LOG2E = 1.4426950408889634
# Attention on the CPU is always sliced: the float32 score slice of a whole batch holds at most this many bytes, so
# a slice of N queries shrinks for large batches (16 video frames at 512x512: 16 queries a slice). Whole 4096-token
# score matrices (537 MB per guidance half at 512x512) outgrew the 512 MB run-ahead bound of a UNet pass
# (cpu_memory): the second CPU stream waited for the first. An SD 1.5 step at 512x512 with guidance on two
# streams (fp32, 2-core EPYC, measured): whole matrices 20.8 s and 4.9 GB peak; slices encoded in turn on both
# streams (cpu_streams.eval_in_lockstep) of 128 MB 16.6 s / 3.9 GB, of 32 MB with the fused exp2 below 14.4 s /
# 3.8 GB (64 MB: 15.4 s, 16 MB: 14.8 s). Metal's fused kernel holds no score matrix.
CPU_SLICE_SCORE_BYTES = 32 * 2**20


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, query_chunk: int | None = None) -> mx.array:
    """softmax(q k^T * scale) v for (B, H, L, D) arrays, without a mask; ``query_chunk`` queries at a time
    (each query's softmax is its own, so chunks give the same numbers and cap the score matrix); on the CPU
    always in slices of at most ``CPU_SLICE_SCORE_BYTES`` of scores, fewer queries if ``query_chunk`` says so."""
    if not on_cpu():
        if query_chunk and q.shape[2] > query_chunk:
            return mx.concatenate([mx.fast.scaled_dot_product_attention(q[:, :, s:s + query_chunk], k, v, scale=scale)
                                   for s in range(0, q.shape[2], query_chunk)], axis=2)
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
    cap = max(1, CPU_SLICE_SCORE_BYTES // (q.shape[0] * q.shape[1] * k.shape[2] * 4))
    query_chunk = min(query_chunk or cap, cap)
    dtype = q.dtype
    if dtype != mx.float32:  # softmax statistics in float32, as the fused kernel keeps them
        q, k, v = q.astype(mx.float32), k.astype(mx.float32), v.astype(mx.float32)
    q = q * (scale * LOG2E)  # base-2 scores
    k_t = k.swapaxes(-1, -2)
    # A column of ones after the values: the product with the weights brings each row's sum with it, one BLAS
    # call instead of a reduction pass over the score-sized weights.
    v_ones = mx.concatenate([v, mx.ones((*v.shape[:-1], 1), dtype=v.dtype)], axis=-1)
    if q.shape[2] > query_chunk:
        out = mx.concatenate([mark(softmax_product(q[:, :, s:s + query_chunk], k_t, v_ones))
                              for s in range(0, q.shape[2], query_chunk)], axis=2)
    else:
        out = softmax_product(q, k_t, v_ones)
    return out if dtype == mx.float32 else out.astype(dtype)


def softmax_product(q: mx.array, k_t: mx.array, v_ones: mx.array) -> mx.array:
    """softmax_2(q k_t) v for base-2 scores, ``v_ones`` being v with a column of ones appended (its product
    column is the weights' row sum, so the normalisation comes after the product, on D columns)."""
    scores = q @ k_t
    out = exp2_nonpositive(scores, scores.max(axis=-1, keepdims=True)) @ v_ones
    return out[..., :-1] / out[..., -1:]


# 2^f for f in [-1/2, 1/2]: a degree-6 polynomial fit for relative error (Lawson-weighted least squares on Chebyshev
# nodes; max relative error 1.0e-7 evaluated in float32 by Horner's rule, 1.3e-7 as evaluated below).
EXP2_COEFFICIENTS = (1.0, 0.6931471824645996, 0.24022646248340607, 0.05550328642129898, 0.009618489071726799,
                     0.0013399930903688073, 0.00015345794963650405)
ROUNDING_SHIFT = 12582912.0  # 1.5 * 2^23: (x + it) - it rounds a float32 |x| < 2^22 to the nearest integer
EXP2_FLOOR = -125.0  # 2^(r + f) stays a normal float32 for r >= -125: no subnormal operands for the product after


def _exp2_parts(x: mx.array, shift: mx.array) -> tuple[mx.array, mx.array]:
    """2^f and the float32 bits of 2^r for x - shift = r + f, r the nearest integer (the shift in the same pass).

    Every op here vectorises (no floor, no variable shift) and the chain stays shallow enough (pairs first, then
    Horner in f^2) for MLX to fuse it into one kernel; the bits need a view, which does not fuse: two outputs."""
    x = mx.maximum(x - shift, EXP2_FLOOR)
    r = (x + ROUNDING_SHIFT) - ROUNDING_SHIFT
    f = x - r  # exact in float32
    c = EXP2_COEFFICIENTS
    f2 = f * f
    p = (c[0] + c[1] * f) + f2 * ((c[2] + c[3] * f) + f2 * ((c[4] + c[5] * f) + f2 * c[6]))
    return p, mx.left_shift(r.astype(mx.int32) + 127, 23)


_exp2_parts_compiled = mx.compile(_exp2_parts)  # not shapeless: MLX cannot infer the view's shape after it
_times_compiled = mx.compile(lambda a, b: a * b)


def cpu_kernels_compile() -> bool:
    """Whether MLX's CPU build can fuse a compiled graph into one kernel here: on Linux it compiles the
    generated C++ with ``g++`` at run time, and without one it runs the graph op by op."""
    return not sys.platform.startswith("linux") or shutil.which("g++") is not None


FUSED_EXP2 = cpu_kernels_compile()


def exp2_nonpositive(x: mx.array, shift: mx.array | float = 0.0) -> mx.array:
    """2^(x - shift) for float32 x <= shift (softmax scores and their maximum); values below -125 give 2^-125.

    MLX's CPU ``mx.power(2, x)`` runs at about 180-300 M elements/s per core and ``mx.exp`` at 50-85 M/s;
    this polynomial with exponent bits at 690-780 M/s, to a relative error of 1.2e-7 against float64 (2-core
    EPYC with AVX-512, MLX 0.32.4, 33.5M elements, measured). The first form (floor, Horner's rule) ran as four
    kernels at 385 M/s. Without a compiler the op-by-op graph would be slower than the power, which then runs."""
    if not FUSED_EXP2:
        return mx.power(2.0, x - shift)
    p, bits = _exp2_parts_compiled(x.astype(mx.float32), mx.array(shift, mx.float32))  # float32 bits (a no-op cast)
    return _times_compiled(p, bits.view(mx.float32))


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


def _erfc_rational(x: mx.array) -> tuple[mx.array, mx.array]:
    """z = |x| / sqrt2 and the rational factor of A&S 7.1.26's erfc(z) (pairs first: a shallow chain to fuse)."""
    z = mx.abs(x) * 0.7071067811865476
    t = 1.0 / (1.0 + _AS_P * z)
    a1, a2, a3, a4, a5 = _AS_A
    t2 = t * t
    return z, t * ((a1 + a2 * t) + t2 * ((a3 + a4 * t) + t2 * a5))


def _gelu_from_tail(x: mx.array, tail: mx.array) -> mx.array:
    """x * Phi(x) from tail = erfc(|x| / sqrt2), without cancellation for x < 0."""
    return 0.5 * x * mx.where(x < 0, tail, 2.0 - tail)


def _gelu_parts(x: mx.array) -> tuple[mx.array, mx.array]:
    """The rational part of erfc(|x|/sqrt2) times 2^f of its exponential, and the bits of 2^r (as _exp2_parts)."""
    z, rational = _erfc_rational(x)
    p, bits = _exp2_parts(-(z * z) * LOG2E, 0.0)
    return rational * p, bits


_gelu_parts_compiled = mx.compile(_gelu_parts)
_gelu_finish_compiled = mx.compile(lambda x, part, scale: _gelu_from_tail(x, part * scale))


def gelu(x: mx.array) -> mx.array:
    """Exact (erf) GELU, x * Phi(x); on the CPU through a rational erfc, without cancellation for x < 0.

    With MLX's CPU compiler, two fused kernels around the exp2 parts: 35 instead of 84 ms for the (4096, 1280)
    GEGLU gate of SD 1.5 at 512x512 (one core of a 2-core EPYC with AVX-512, measured), the same numbers to
    float32 rounding."""
    if not on_cpu():
        return nn.gelu(x)
    if not FUSED_EXP2:
        z, rational = _erfc_rational(x)
        return _gelu_from_tail(x, rational * mx.power(2.0, (z * z) * -LOG2E))
    # in float32: the rounding shift and exponent bits are float32's (half inputs would overflow)
    x32 = x if x.dtype == mx.float32 else x.astype(mx.float32)
    part, bits = _gelu_parts_compiled(x32)
    out = _gelu_finish_compiled(x32, part, bits.view(mx.float32))
    return out if x.dtype == mx.float32 else out.astype(x.dtype)


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

