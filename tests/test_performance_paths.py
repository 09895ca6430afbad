"""Compiled, quantized, chunked and low-memory paths keep the results (timings are never asserted)."""

import numpy as np
import pytest
from conftest import report

import mlx.core as mx
from mlx_stablefused import TextToImageDiffusion, TextToVideoDiffusion

ARGS = dict(prompt=["a photo of the cat", "an astronaut"], negative_prompt="blurry", num_inference_steps=3, seed=4,
            image_height=64, image_width=64, output_type="np")


@pytest.fixture
def pipe(sd1):
    _, root = sd1
    p = TextToImageDiffusion(root, progress=False, scheduler="ddim")
    return p, p(**ARGS)


def test_compiled_unet_gives_the_same_images(pipe):
    p, plain = pipe
    p.enable_compile()
    compiled = p(**ARGS)
    assert report("compiled UNet vs eager (max abs)", np.abs(compiled - plain).max()) < 1e-4


def test_compiled_motion_unet(sd1, tmp_path):
    from tiny_models import build_motion_adapter

    _, root = sd1
    build_motion_adapter(True).save_pretrained(str(tmp_path / "ad"))
    video = TextToVideoDiffusion(root, motion_adapter=tmp_path / "ad", progress=False)
    args = dict(prompt="x", video_frames=4, video_height=64, video_width=64, num_inference_steps=2, seed=0,
                output_type="np")
    plain = video(**args)
    video.enable_compile()
    assert np.abs(video(**args) - plain).max() < 1e-4


@pytest.mark.parametrize("bits,tol", [(8, 0.02), (4, 0.15)])
def test_quantized_unet_stays_close(pipe, bits, tol):
    p, plain = pipe
    p.quantize(bits=bits, group_size=32, components=("unet", "text_encoder"))
    q = p(**ARGS)
    err = np.abs(q - plain).max()
    assert report(f"{bits}-bit quantized UNet + text encoder vs fp32 (max abs)", err) < tol
    assert err > 0  # the quantized path really ran


def test_low_memory_releases_and_reloads_the_text_encoder(pipe):
    p, plain = pipe
    p.enable_low_memory()
    first = p(**ARGS)
    params = p.backend.text_encoder.text_model.final_layer_norm.weight
    again = p(**ARGS)
    np.testing.assert_array_equal(first, plain)
    np.testing.assert_array_equal(again, plain)
    assert isinstance(params, mx.array)


def test_attention_chunking_and_strip_convolutions_are_exact(pipe):
    from mlx_stablefused.backends.mlx.layers import StripConv2d

    p, plain = pipe
    p.enable_attention_slicing(5)
    old = StripConv2d.max_patch_bytes
    StripConv2d.max_patch_bytes = 4096  # force strips on these tiny maps
    try:
        out = p(**ARGS)
    finally:
        StripConv2d.max_patch_bytes = old
    assert np.abs(out - plain).max() < 1e-5


def test_quantize_rejects_bad_arguments(pipe):
    p, _ = pipe
    with pytest.raises(ValueError, match="bits"):
        p.quantize(bits=5)
    with pytest.raises(ValueError, match="components"):
        p.quantize(components=("vae",))
