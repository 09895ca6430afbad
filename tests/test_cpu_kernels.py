"""The CPU formulations (base-2 softmax and SiLU, BLAS GroupNorm sums, bounded run-ahead) against the
fused / reduction forms Metal runs, and against float64 references. CI runs on a CPU, so every
diffusers parity test exercises the CPU forms; these tests keep the Metal forms checked as well."""

import numpy as np
import pytest
from helpers import max_abs_error, report

import mlx.core as mx
import mlx.nn as nn
from mlx_stablefused import TextToImageDiffusion
from mlx_stablefused.backends.mlx import cpu_math, layers
from mlx_stablefused.backends.mlx.cpu_memory import bounded_run_ahead
from mlx_stablefused.backends.mlx.cpu_streams import StreamSet, split_axis
from mlx_stablefused.backends.mlx.layers import GroupNorm, StripConv2d


@pytest.fixture
def metal_forms(monkeypatch):
    """Run the code paths that a GPU default device takes, on this CPU."""
    monkeypatch.setattr(cpu_math, "on_cpu", lambda: False)


def softmax_attention_64(q, k, v, scale):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    s = q @ k.swapaxes(-1, -2) * scale
    w = np.exp(s - s.max(-1, keepdims=True))
    return (w / w.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("lq,lk,d", [(64, 64, 40), (100, 77, 64), (3, 300, 8)])
def test_cpu_attention_matches_the_fused_kernel_and_float64(lq, lk, d):
    rng = np.random.default_rng(lq)
    q, k, v = (mx.array(rng.standard_normal((2, 3, n, d)).astype(np.float32) * 2) for n in (lq, lk, lk))
    ref = softmax_attention_64(q, k, v, d**-0.5)
    ours = np.asarray(cpu_math.attention(q, k, v, d**-0.5))
    fused = np.asarray(mx.fast.scaled_dot_product_attention(q, k, v, scale=d**-0.5))
    err = report(f"CPU base-2 attention vs float64 (max abs) L={lq}x{lk}", np.abs(ours - ref).max())
    assert err < 1.5e-5 and err <= 2 * np.abs(fused - ref).max() + 1e-6  # as close as the fused kernel
    half = cpu_math.attention(q.astype(mx.float16), k.astype(mx.float16), v.astype(mx.float16), d**-0.5)
    assert half.dtype == mx.float16 and np.abs(np.asarray(half.astype(mx.float32)) - ref).max() < 2e-2


def test_cpu_attention_slices_shrink_with_the_batch_and_keep_the_numbers(monkeypatch):
    """Sliced attention on the CPU: a batch whose score slice would pass the byte cap is cut into smaller query
    slices (the 16 frames of a video), asked for or not, with the same numbers as one slice (each query's
    softmax is its own)."""
    rng = np.random.default_rng(9)
    q, k, v = (mx.array(rng.standard_normal((4, 2, n, 16)).astype(np.float32)) for n in (96, 80, 80))
    whole = np.asarray(cpu_math.attention(q, k, v, 0.25))
    sizes = []
    product = cpu_math.softmax_product
    monkeypatch.setattr(cpu_math, "softmax_product", lambda q, *a: sizes.append(q.shape[2]) or product(q, *a))
    monkeypatch.setattr(cpu_math, "CPU_SLICE_SCORE_BYTES", 4 * 2 * 20 * 80 * 4)  # 20 queries of this batch
    sliced = np.asarray(cpu_math.attention(q, k, v, 0.25, query_chunk=64))
    assert sizes == [20, 20, 20, 20, 16]  # 64 queries asked, 20 fit the cap
    unasked = np.asarray(cpu_math.attention(q, k, v, 0.25))  # on the CPU sliced by the cap, asked for or not
    assert sizes == [20, 20, 20, 20, 16] * 2 and np.abs(unasked - whole).max() < 1e-6
    assert report("CPU attention, slices cut by the byte cap vs one slice (max abs)", np.abs(sliced - whole).max()) < 1e-6


def test_cpu_exp2_matches_float64_fused_or_not(monkeypatch):
    """The attention softmax's 2^x for x <= 0 (fused polynomial with exponent bits where MLX's CPU build can
    compile, mx.power where it cannot): both within 2e-7 relative of float64 down to -125, clamped below it,
    NaN kept."""
    x = mx.array(np.concatenate([np.linspace(-140, 0, 200001), [-np.inf, 0.0, np.nan]]).astype(np.float32))
    ref = 2.0 ** np.maximum(np.asarray(x, np.float64), -125.0)
    for fused in (True, False):
        monkeypatch.setattr(cpu_math, "FUSED_EXP2", fused)
        ours = np.asarray(cpu_math.exp2_nonpositive(x), np.float64)
        normal = np.asarray(x)[:-3] >= -125  # below, the fused form clamps and the power goes subnormal
        rel = (np.abs(ours[:-3] - ref[:-3]) / ref[:-3])[normal]
        assert report(f"CPU exp2 ({'fused' if fused else 'mx.power'}) vs float64 (max rel)", rel.max()) < 2e-7
        assert ours[-3] <= 2.0**-125 and ours[-2] == 1.0 and np.isnan(ours[-1])


def test_cpu_activations_match_mlx_and_float64():
    x = mx.array(np.concatenate([np.linspace(-120, 120, 20001), [-1e30, 1e30, 0.0]]).astype(np.float32))
    x64 = np.asarray(x, np.float64)
    with np.errstate(over="ignore"):
        silu64 = x64 / (1 + np.exp(-x64))
        sig64 = 1 / (1 + np.exp(-1.702 * x64))
    silu, mlx_silu = np.asarray(cpu_math.silu(x)), np.asarray(nn.silu(x))
    assert np.isfinite(silu).all() and silu[-3] == 0 and silu[-2] == 1e30 and silu[-1] == 0
    normal = np.abs(silu64) > 1e-30  # below, float32 underflows for both forms alike
    rel = np.abs(silu - silu64)[normal] / np.abs(silu64)[normal]
    mlx_rel = np.abs(mlx_silu - silu64)[normal] / np.abs(silu64)[normal]
    assert report("CPU SiLU vs float64 (max rel, normal range)", rel.max()) <= max(2e-6, 1.5 * mlx_rel.max())
    sig = np.asarray(cpu_math.sigmoid_scaled(x, 1.702))
    normal = sig64 > 1e-30
    assert np.isfinite(sig).all() and np.max(np.abs(sig - sig64)[normal] / sig64[normal]) < 4e-6


def test_cpu_gelu_matches_float64_as_closely_as_mlx(monkeypatch):
    """Both CPU forms: the fused kernels around the exp2 parts, and the op-by-op graph without a compiler."""
    from scipy.special import erf

    x = mx.array(np.concatenate([np.linspace(-15, 15, 300001), [-1e30, 1e30, 0.0, 1e-30, -1e-30]]).astype(np.float32))
    x64 = np.asarray(x, np.float64)
    ref = 0.5 * x64 * (1 + erf(x64 / np.sqrt(2)))
    theirs = np.asarray(nn.gelu(x), np.float64)
    for fused in (True, False):
        monkeypatch.setattr(cpu_math, "FUSED_EXP2", fused)
        ours = np.asarray(cpu_math.gelu(x), np.float64)
        name = "fused" if fused else "op by op"
        err = report(f"CPU GELU (A&S erfc, {name}) vs float64 (max abs)", np.abs(ours - ref)[:-5].max())
        assert err <= 1.2 * np.abs(theirs - ref)[:-5].max() + 1e-7
        small = np.abs(x64) < 1  # near zero GELU ~ x/2: relative accuracy matters
        assert np.max(np.abs(ours - ref)[small] / np.maximum(np.abs(ref[small]), 1e-30)) < 1e-5
        np.testing.assert_array_equal(ours[-5:], theirs[-5:])  # -0, 1e30, 0, +-5e-31: limits and tiny inputs
        half = x[:-5].astype(mx.float16)  # computed in float32 inside, rounded once to half
        want = np.asarray(nn.gelu(half.astype(mx.float32)).astype(mx.float16), np.float64)
        got = np.asarray(cpu_math.gelu(half), np.float64)
        assert cpu_math.gelu(half).dtype == mx.float16 and np.isfinite(got).all()
        assert np.abs(got - want).max() <= 2.0**-10 * np.abs(want).max()


def test_metal_forms_are_the_fused_ones(metal_forms):
    x = mx.array(np.linspace(-5, 5, 101).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(cpu_math.silu(x)), np.asarray(nn.silu(x)))
    np.testing.assert_array_equal(np.asarray(cpu_math.gelu(x)), np.asarray(nn.gelu(x)))
    np.testing.assert_array_equal(np.asarray(cpu_math.sigmoid_scaled(x, 1.702)), np.asarray(mx.sigmoid(1.702 * x)))


def group_norm_64(x, groups, weight, bias, eps):
    b, c = x.shape[0], x.shape[-1]
    y = np.asarray(x, np.float64).reshape(b, -1, groups, c // groups)
    mean = y.mean(axis=(1, 3), keepdims=True)
    var = ((y - mean) ** 2).mean(axis=(1, 3), keepdims=True)
    out = (y - mean) / np.sqrt(var + eps) * np.asarray(weight).reshape(groups, -1) + np.asarray(bias).reshape(groups, -1)
    return out.reshape(x.shape)


@pytest.mark.parametrize("form", ["cpu", "metal", "pieces"])
@pytest.mark.parametrize("shape,groups", [((2, 24, 20, 64), 32), ((1, 5, 3, 7, 48), 4), ((3, 77, 32), 8)])
def test_group_norm_matches_float64(request, monkeypatch, form, shape, groups):
    if form == "metal":
        request.getfixturevalue("metal_forms")
    if form == "pieces":  # large inputs go in row pieces: here uneven ones of 2 rows (tokens), as bands and whole
        monkeypatch.setattr(layers, "PIECE_BYTES", 4 * 2 * int(np.prod(shape[2:])) * shape[0])
    rng = np.random.default_rng(1)
    x = mx.array((rng.standard_normal(shape) * 3 + 5).astype(np.float32))  # an offset mean tests the two passes
    norm = GroupNorm(groups, shape[-1], 1e-6)
    norm.weight = mx.array(rng.standard_normal(shape[-1]).astype(np.float32))
    norm.bias = mx.array(rng.standard_normal(shape[-1]).astype(np.float32))
    ref = group_norm_64(x, groups, norm.weight, norm.bias, 1e-6)
    assert report(f"GroupNorm {shape} vs float64 [{form}]", np.abs(np.asarray(norm(x)) - ref).max()) < 1e-5
    if len(shape) == 4:
        bands = norm.over_bands(split_axis(x, 2, axis=1), StreamSet(2).streams)
        assert np.abs(np.asarray(mx.concatenate(bands, axis=1)) - ref).max() < 1e-5
    half = norm(x.astype(mx.float16))
    assert half.dtype == mx.float16 and np.abs(np.asarray(half.astype(mx.float32)) - ref).max() < 2e-2


def test_metal_forms_give_the_same_images(sd1, pipelines, metal_forms, monkeypatch):
    """The whole pipeline with the GPU formulations (fused attention, reductions) vs the CPU ones."""
    args = dict(prompt="a cat", negative_prompt="blurry", num_inference_steps=2, seed=3, image_height=64,
                image_width=64, output_type="np")
    pipe = pipelines.pipeline(TextToImageDiffusion, sd1[1], scheduler="ddim")
    metal = pipe(**args)
    monkeypatch.setattr(cpu_math, "on_cpu", lambda: True)
    cpu = pipe(**args)
    assert report("pipeline, Metal forms vs CPU forms (max abs)", max_abs_error(metal, cpu)) < 1e-4


def test_bounded_run_ahead_restores_the_limit_and_lowers_the_peak():
    conv = StripConv2d(64, 64, 3, padding=1)
    conv.max_patch_bytes = 2 * 2**20  # 8 strips of a 9 MB patch matrix
    x = mx.random.normal((1, 128, 128, 64))
    mx.eval(x, conv.parameters())

    def peak_over_start(headroom):
        start = mx.get_active_memory()
        mx.reset_peak_memory()
        with bounded_run_ahead(headroom):
            y = conv(x)
            mx.eval(y)
        return (mx.get_peak_memory() - start) / 2**20, np.asarray(y)

    before = mx.set_memory_limit(0)
    mx.set_memory_limit(before)
    free_peak, free = peak_over_start(None)
    bounded_peak, bounded = peak_over_start(4 * 2**20)
    assert mx.set_memory_limit(before) == before  # the limit came back after the pass
    np.testing.assert_array_equal(bounded, free)
    report("strip conv peak MB, free run-ahead (a size, not an error)", free_peak)
    report("strip conv peak MB, 4 MB run-ahead bound (a size, not an error)", bounded_peak)
    assert bounded_peak < free_peak


@pytest.mark.parametrize("dtype,bias", [(mx.float16, True), (mx.bfloat16, False)])
def test_half_linear_on_cpu_matches_mlx_and_float64(dtype, bias):
    """The float32-BLAS product of half-precision Linear layers gives MLX's own half result (both round a
    float32-accumulated product), and is still an nn.Linear for quantization and LoRA."""
    layer = nn.Linear(96, 80, bias=bias)
    layer.set_dtype(dtype)
    x = mx.random.normal((2, 33, 96), key=mx.random.key(3)).astype(dtype)
    own = np.asarray(nn.Linear.__call__(layer, x).astype(mx.float32))
    cpu_math.half_linears_in_float32(layer)
    assert isinstance(layer, cpu_math.HalfLinearOnCPU) and isinstance(layer, nn.Linear)
    ours = layer(x)
    assert ours.dtype == dtype
    f64 = np.asarray(x.astype(mx.float32), np.float64) @ np.asarray(layer.weight.astype(mx.float32), np.float64).T
    f64 = f64 + (np.asarray(layer.bias.astype(mx.float32)) if bias else 0)
    ours = np.asarray(ours.astype(mx.float32))
    err = report(f"CPU {dtype} Linear via float32 BLAS vs float64 (max abs)", np.abs(ours - f64).max())
    assert err <= np.abs(own - f64).max() * 1.01 + 1e-7  # as close as MLX's half-precision kernel
    assert np.abs(layer(x.astype(mx.float32)) - nn.Linear.__call__(layer, x.astype(mx.float32))).max() == 0


@pytest.mark.parametrize("dtype,eps", [(mx.float16, 2.0**-10), (mx.bfloat16, 2.0**-7)])
def test_quantized_half_linear_on_cpu_is_the_dequantized_product(dtype, eps):
    """8-bit layers with half-precision activations: the float32 product with the dequantized weights, rounded
    to the activations' dtype (MLX's own half-precision CPU kernel, 40x slower, is no closer)."""
    layer = nn.Linear(128, 80)
    layer.set_dtype(dtype)
    quantized = nn.QuantizedLinear.from_linear(layer, group_size=64, bits=8)
    x = mx.random.normal((2, 33, 128), key=mx.random.key(5)).astype(dtype)
    own = np.asarray(nn.QuantizedLinear.__call__(quantized, x).astype(mx.float32))
    cpu_math.half_quantized_linears_in_float32(quantized)
    assert isinstance(quantized, cpu_math.QuantizedHalfLinearOnCPU) and type(quantized).__name__.startswith("Quantized")
    ours = quantized(x)
    assert ours.dtype == dtype
    w = mx.dequantize(quantized.weight, quantized.scales, quantized.biases, group_size=64, bits=8)
    f64 = np.asarray(x.astype(mx.float32), np.float64) @ np.asarray(w.astype(mx.float32), np.float64).T
    f64 = f64 + np.asarray(quantized.bias.astype(mx.float32), np.float64)
    err = report(f"CPU 8-bit {dtype} layer vs float64 with the dequantized weights (max abs)",
                 np.abs(np.asarray(ours.astype(mx.float32)) - f64).max())
    assert err <= np.abs(f64).max() * eps  # the result's own rounding (half an ulp), plus float32 accumulation
    assert err <= np.abs(own - f64).max() * 1.01 + 1e-7


def test_vae_attention_slices_itself_at_large_sizes_exactly(monkeypatch):
    """The VAE's one-head attention over every pixel takes automatic query slices once its float32 scores outgrow
    ``SCORE_SLICE_BYTES`` (at SDXL's 1024x1024: 8 slices of 2048 of the 16384 queries, where the whole held 2 GiB
    of scores and softmax weights; the memory rows measure the decode's peak); uneven automatic slices and a
    caller's smaller slice give the unsliced output."""
    from mlx_stablefused.backends.mlx import vae

    assert vae.automatic_query_chunk(1, 128 * 128) == 2048 and vae.automatic_query_chunk(2, 128 * 128) == 1024
    assert vae.automatic_query_chunk(1, 64 * 64) is None  # SD 1.x at 512x512: 64 MiB, whole as before
    attn = vae.SpatialSelfAttention(16, 4)
    x = mx.random.normal((2, 32, 32, 16))
    mx.eval(x, attn.parameters())
    chunks = []

    def recorded(q, k, v, scale, query_chunk=None):
        chunks.append(query_chunk)
        return cpu_math.attention(q, k, v, scale, query_chunk)

    monkeypatch.setattr(vae, "attention", recorded)
    whole = np.asarray(attn(x))
    monkeypatch.setattr(vae, "SCORE_SLICE_BYTES", 4 * 2 * 1024 * 300)  # 300 queries a slice, the last one 124
    assert vae.automatic_query_chunk(2, 1024) == 300
    sliced = np.asarray(attn(x))
    attn.set_query_chunk(256)  # the caller's smaller slice wins
    smaller = np.asarray(attn(x))
    assert chunks == [None, 300, 256]
    assert report("VAE attention, automatic query slices vs whole", max_abs_error(sliced, whole)) < 1e-6
    assert max_abs_error(smaller, whole) < 1e-6


def test_group_norm_in_row_pieces_lowers_the_peak_under_the_run_ahead_bound(monkeypatch):
    """A float16 map normalised whole held its float32 copy, deviations and output at once (4x the map under the
    bound VAE passes run with); in row pieces about 2x (SDXL's VAE decode at 1024x1024: 256-channel maps of
    512 MiB), whole-image call and row bands alike, to float16 rounding of the same values."""
    x = mx.random.normal((1, 128, 128, 128)).astype(mx.float16)  # a 4 MiB map
    norm = GroupNorm(32, 128, 1e-6)
    mx.eval(x, norm.parameters())
    streams = StreamSet(2).streams

    def peaks():
        out = {}
        for form, run in (("whole", lambda: [norm(x)]), ("bands", lambda: norm.over_bands(split_axis(x, 2, axis=1),
                                                                                          streams, silu=True))):
            start = mx.get_active_memory()
            mx.reset_peak_memory()
            with bounded_run_ahead(4 * 2**20):
                y = mx.concatenate(run(), axis=1)
                mx.eval(y)
            out[form] = ((mx.get_peak_memory() - start) / 2**20, np.asarray(y.astype(mx.float32)))
        return out

    monkeypatch.setattr(layers, "PIECE_BYTES", 2**40)
    whole = peaks()
    monkeypatch.setattr(layers, "PIECE_BYTES", 2**19)  # 16 pieces
    pieces = peaks()
    for form in ("whole", "bands"):
        report(f"GroupNorm peak MB, 4 MiB fp16 map, {form}: whole (a size, not an error)", whole[form][0])
        report(f"GroupNorm peak MB, 4 MiB fp16 map, {form}: row pieces (a size, not an error)", pieces[form][0])
        assert pieces[form][0] < 0.7 * whole[form][0]
        assert max_abs_error(pieces[form][1], whole[form][1]) < 1e-2  # float16 outputs of values ~4
