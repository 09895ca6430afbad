"""The low-memory preset keeps the default path's images (up to the VAE's sample size), on both backends.

Its parts are each exact: the text encoder and the UNet re-read from the same files, attention sliced over queries,
one image at a time through the VAE (VAE tiling, inexact beyond the VAE's sample size, is not part of it).
The 8-bit UNet is measured apart.
"""

import numpy as np
import pytest
from helpers import max_abs_error, report

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten
from mlx_stablefused import TextToImageDiffusion
from mlx_stablefused.backends.mlx import cpu_math
from mlx_stablefused.pipelines import base

# two images (so one-at-a-time decoding changes the work)
ARGS = dict(prompt=["a photo of the cat", "an astronaut"], negative_prompt="blurry", num_inference_steps=1, seed=7,
            image_height=64, image_width=64, output_type="np")


@pytest.mark.parametrize("backend_name", ["mlx", "torch"])
def test_low_memory_preset_keeps_the_images(sd1, pipelines, backend_name, monkeypatch):
    plain = pipelines.pipeline(TextToImageDiffusion, sd1[1], backend=backend_name, scheduler="ddim")
    expected = plain(**ARGS)
    monkeypatch.setattr(base, "AUTO_ATTENTION_CHUNK", 24)  # slices of 24 queries on the 64-token maps
    low = pipelines.pipeline(TextToImageDiffusion, sd1[1], backend=backend_name, scheduler="ddim")
    low.enable_low_memory()
    assert (low.settings.attention_chunk, low.settings.unet_batch_size, low.decode_batch_size,
            low.release_text_encoder, low.release_unet) == (24, 1, 1, True, True)
    assert low.tiling is None  # tiling changes images beyond the VAE's sample size: the caller's choice
    out = low(**ARGS)
    if backend_name == "mlx":  # both networks were freed: the next call re-reads them from the converted files
        assert max_abs_error(low(**ARGS), expected) == 0
    assert report(f"{backend_name}: low-memory preset vs default (max abs, [0, 1] images)",
                  max_abs_error(out, expected)) < 1e-5
    low.enable_low_memory(False)  # back to the options chosen before it
    assert (low.settings.attention_chunk, low.decode_batch_size, low.tiling, low.release_text_encoder,
            low.release_unet, low.settings.bounded_unet_run_ahead, low.settings.unet_batch_size) == \
        (None, None, None, False, False, True, None)
    with pytest.raises(ValueError, match="unet_bits"):
        low.enable_low_memory(unet_bits=4)
    with pytest.raises(ValueError, match="unet_batch_size"):
        low.enable_low_memory(unet_batch_size=0)
    if backend_name == "torch":
        with pytest.raises(NotImplementedError, match="torch backend has no quantized path"):
            low.enable_low_memory(unet_bits=8)
    assert low.settings.attention_chunk is None  # refused before anything changed


def test_vae_passes_run_ahead_by_their_maps_and_the_preset_keeps_the_flat_bound(sd1, pipelines, monkeypatch):
    """On MLX's CPU build a VAE pass may allocate ahead a few of its largest feature maps (cpu_memory: a flat 512 MB
    starved the second CPU stream at 512x512), the low-memory preset the flat bound; the images stay the same."""
    from mlx_stablefused.backends.mlx import backend as mlx_backend
    from mlx_stablefused.backends.mlx.cpu_memory import vae_headroom

    pipe = pipelines.pipeline(TextToImageDiffusion, sd1[1], backend="mlx", scheduler="ddim")
    seen, bound = [], mlx_backend.bounded_run_ahead
    monkeypatch.setattr(mlx_backend, "bounded_run_ahead", lambda headroom: seen.append(headroom) or bound(headroom))
    monkeypatch.setattr(pipe.backend, "cpu_run_ahead", 1024)  # a floor under the tiny maps' bound
    plan = pipe.backend.vae.plan
    latent = np.random.default_rng(0).standard_normal((2, 4, 8, 6)).astype(np.float32)
    default = pipe.latent_to_image(latent, output_type="np")
    pipe.image_to_latent(default)
    expected = [vae_headroom(2 * plan.decoder.largest_map(8, 6), 1024), vae_headroom(2 * plan.encoder.largest_map(64, 48),
                                                                                     1024)]
    assert seen == expected and min(expected) == 4 * 4 * 2 * 64 * 48 * 16 > 1024  # 16 channels at full size
    pipe.enable_low_memory()
    seen.clear()
    low = pipe.latent_to_image(latent, output_type="np")
    pipe.enable_low_memory(False)
    assert seen == [1024, 1024]  # one image at a time, each with the flat bound
    assert report("mlx: VAE decode under the preset's run-ahead bound vs the default's (max abs, [0, 1] images)",
                  max_abs_error(low, default)) < 1e-6
    # SD 1.5's decoder (largest map: 256 channels at full size) at 256, 512 and 1024 pixels
    assert [vae_headroom(256 * side**2) >> 20 for side in (256, 512, 1024)] == [512, 1024, 2048]


@pytest.mark.slow  # its own model load; 8-bit closeness is also checked by default in test_performance_paths
def test_low_memory_8bit_unet_stays_close(sd1):
    """The 8-bit UNet is the preset's one inexact option: on its own load (quantizing changes the weights)."""
    plain = TextToImageDiffusion(sd1[1], progress=False, scheduler="ddim")
    expected = plain(**ARGS)
    plain.enable_low_memory(unet_bits=8)
    err = max_abs_error(plain(**ARGS), expected)
    assert 0 < report("low-memory preset with the 8-bit UNet vs fp32 (max abs)", err) < 0.02
    assert np.isfinite(err)


class DequantizedLinear(nn.Module):
    """The reference for an 8-bit layer: the float32 product with its dequantized weights, rounded to the
    activations' dtype (what the layer is meant to compute; float16 rounding of the weights would lose bits)."""

    def __init__(self, layer: nn.QuantizedLinear) -> None:
        super().__init__()
        self.w = mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits).astype(mx.float32)
        self.b = layer.bias.astype(mx.float32) if "bias" in layer else None

    def __call__(self, x: mx.array) -> mx.array:
        y = x.astype(mx.float32) @ self.w.T
        return (y if self.b is None else y + self.b).astype(x.dtype)


def test_low_memory_8bit_unet_in_float16_is_the_dequantized_unet(sd1):
    """The preset's 8-bit UNet on a float16 load (MLX's CPU build: the half-precision quantized layers run on
    float32 activations) predicts what the same UNet does with each 8-bit layer replaced by its dequantized
    weights, to float16 rounding; and not what the float16 UNet it came from does (quantization ran)."""
    pipe = TextToImageDiffusion(sd1[1], progress=False, dtype="float16")
    backend, rng = pipe.backend, np.random.default_rng(3)  # the UNet's own inputs: (uncond, cond) halves
    latent = backend.latent_from_numpy(rng.standard_normal((2, 4, 8, 8)))
    text = mx.array(rng.standard_normal((2, 77, backend.unet_config.cross_attention_dim)).astype(np.float32))

    def predict() -> np.ndarray:
        with backend.using(pipe.settings):
            return np.asarray(backend.unet(latent, 700.0, text))

    half = predict()
    pipe.enable_low_memory(unet_bits=8)
    unet = backend.unet_model
    quantized = [(name, m) for name, m in unet.named_modules() if isinstance(m, nn.QuantizedLinear)]
    # the tiny UNet's layers whose inputs are a multiple of the preset's 64-wide groups, in both kinds of block
    assert all(any(name.endswith(kind) for name, _ in quantized) for kind in ("time_emb_proj", "ff.net.2")) and all(isinstance(m, cpu_math.QuantizedHalfLinearOnCPU) for _, m in quantized)
    eight_bit = predict()
    unet.update_modules(tree_unflatten([(name, DequantizedLinear(m)) for name, m in quantized]))
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in unet.named_modules())
    dequantized = predict()
    scale = np.abs(dequantized).max()
    err = report("8-bit float16 UNet vs its dequantized weights in float32 products (max abs / max abs output)",
                 max_abs_error(eight_bit, dequantized) / scale)
    assert err < 4e-3  # a few float16 ulps: 8-bit weights are as precise as float16 activations, so the float16
    report("8-bit float16 UNet vs the float16 one (max abs / max abs output; a size, not an error)",  # UNet is
           max_abs_error(eight_bit, half) / scale)  # as near: the layer test in test_cpu_kernels checks each product


def test_cli_refuses_the_8bit_unet_on_torch_before_loading(capsys, tmp_path):
    from mlx_stablefused import cli

    argv = ["txt2img", "--prompt", "x", "--backend", "torch", "--low-memory-8bit-unet", "--output",
            str(tmp_path / "o.png")]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("mlx-stablefused: error: --low-memory-8bit-unet: the torch backend") and err.count("\n") == 1
    assert not list(tmp_path.iterdir())
