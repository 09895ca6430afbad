"""Compiled, quantized, chunked and low-memory paths keep the results (timings are never asserted)."""

import numpy as np
import pytest
from helpers import max_abs_error, report

import mlx.core as mx
from mlx_stablefused import TextToImageDiffusion, TextToVideoDiffusion

ARGS = dict(prompt=["a photo of the cat", "an astronaut"], negative_prompt="blurry", num_inference_steps=3, seed=4,
            image_height=64, image_width=64, output_type="np")


@pytest.fixture(scope="module")
def plain(sd1, pipelines):
    """The eager fp32 images every path below must reproduce (from the session's shared model)."""
    return pipelines.pipeline(TextToImageDiffusion, sd1[1], scheduler="ddim")(**ARGS)


@pytest.fixture
def private(sd1):
    """A pipeline on its own load of sd1, for paths that change the backend for good (compile, quantize)."""
    return TextToImageDiffusion(sd1[1], progress=False, scheduler="ddim")


def test_compiled_unet_gives_the_same_images(private, plain):
    private.enable_compile()
    assert report("compiled UNet vs eager (max abs)", max_abs_error(private(**ARGS), plain)) < 1e-4


@pytest.mark.slow  # ~10 s with a cold MLX kernel cache; the compiled path is checked on images by default
def test_compiled_motion_unet(sd1, motion_adapters, pipelines):
    args = dict(prompt="x", video_frames=4, video_height=64, video_width=64, num_inference_steps=2, seed=0,
                output_type="np")
    folder = motion_adapters[True][1]
    eager = pipelines.pipeline(TextToVideoDiffusion, sd1[1], motion_adapter=folder)(**args)
    video = TextToVideoDiffusion(sd1[1], motion_adapter=folder, progress=False)
    video.enable_compile()
    assert max_abs_error(video(**args), eager) < 1e-4


@pytest.mark.parametrize("bits,tol", [(8, 0.02), (4, 0.15)])
def test_quantized_unet_stays_close(private, plain, bits, tol):
    private.quantize(bits=bits, group_size=32, components=("unet", "text_encoder"))
    err = max_abs_error(private(**ARGS), plain)
    assert report(f"{bits}-bit quantized UNet + text encoder vs fp32 (max abs)", err) < tol
    assert err > 0  # the quantized path really ran


def test_low_memory_releases_and_reloads_the_text_encoder(sd1, pipelines, plain):
    p = pipelines.pipeline(TextToImageDiffusion, sd1[1], scheduler="ddim")
    p.enable_low_memory()  # this pipeline's setting; the shared backend re-reads the weights when next needed
    first = p(**ARGS)
    params = p.backend.text_encoder.text_model.final_layer_norm.weight
    again = p(**ARGS)
    np.testing.assert_array_equal(first, plain)
    np.testing.assert_array_equal(again, plain)
    assert isinstance(params, mx.array)


def test_attention_chunking_and_strip_convolutions_are_exact(sd1, pipelines, plain, monkeypatch):
    from mlx_stablefused.backends.mlx.layers import StripConv2d

    p = pipelines.pipeline(TextToImageDiffusion, sd1[1], scheduler="ddim")
    monkeypatch.setattr(StripConv2d, "max_patch_bytes", 4096)  # force strips on these tiny maps
    p.enable_attention_slicing(5)  # backend-wide: undone below for the tests sharing the model
    try:
        out = p(**ARGS)
    finally:
        p.disable_attention_slicing()
    assert max_abs_error(out, plain) < 1e-5


def test_quantize_rejects_bad_arguments(sd1, pipelines):
    p = pipelines.pipeline(TextToImageDiffusion, sd1[1])  # refused before anything changes
    with pytest.raises(ValueError, match="bits"):
        p.quantize(bits=5)
    with pytest.raises(ValueError, match="components"):
        p.quantize(components=("vae",))


# ------------------------------------------------------------------ CPU streams (MLX's CPU build)
def test_cpu_streams_give_the_same_images(sd1):
    """Guidance halves and VAE row bands on 1, 2 or 3 streams: the same images up to float32 rounding."""
    _, root = sd1
    p = TextToImageDiffusion(root, progress=False, scheduler="ddim")  # its own load: streams are backend-wide
    args = dict(ARGS, image_height=104, image_width=72)  # 13x9 latents: 3 bands of uneven height
    outs = {}
    for count in (1, 2, 3):
        assert p.set_cpu_streams(count) == count
        outs[count] = p(**args)
    for count in (2, 3):
        assert report(f"{count} CPU streams vs 1 (max abs)", np.abs(outs[count] - outs[1]).max()) < 1e-5


def test_vae_row_bands_match_the_whole_image(sd1, monkeypatch):
    """Decoder and encoder on row bands (with strip convolutions inside the bands) vs one stream."""
    from mlx_stablefused.backends.mlx.cpu_streams import StreamSet
    from mlx_stablefused.backends.mlx.layers import StripConv2d

    _, root = sd1
    vae = TextToImageDiffusion(root, progress=False).backend.vae  # its own load: stream sets are backend-wide
    z = mx.random.normal((2, 11, 13, 4), key=mx.random.key(0))
    images = mx.random.uniform(-1, 1, (1, 88, 72, 3), key=mx.random.key(1))
    vae.set_stream_set(None)
    whole = [vae.decode(z), *vae.encode(images)]
    default_patch = StripConv2d.max_patch_bytes
    for count, patch in ((2, default_patch), (3, 4096)):
        monkeypatch.setattr(StripConv2d, "max_patch_bytes", patch)
        vae.set_stream_set(StreamSet(count))
        banded = [vae.decode(z), *vae.encode(images)]
        for name, a, b in zip(("decode", "encode mean", "encode logvar"), whole, banded):
            scale = float(mx.abs(a).max())
            assert report(f"VAE {name} on {count} row bands (rel)", float(mx.abs(a - b).max()) / scale) < 1e-5


def test_unet_batch_split_over_streams(sd1, monkeypatch):
    """An odd batch split over streams (2 + 1) and a context batch that cannot be split; the streams' graphs
    are encoded in turn, layer by layer (every resnet layer of each part marked, the lists consumed)."""
    from mlx_stablefused.backends.mlx import backend as mlx_backend

    _, root = sd1
    backend = TextToImageDiffusion(root, progress=False).backend  # its own load: streams are backend-wide
    lat = mx.random.normal((3, 8, 8, 4), key=mx.random.key(2))
    ctx = mx.random.normal((3, 77, backend.text_config.hidden_size), key=mx.random.key(3))
    backend.set_cpu_streams(1)
    one = backend.unet(lat, 321.0, ctx)
    backend.set_cpu_streams(2)
    seen = []
    lockstep = mlx_backend.eval_in_lockstep
    monkeypatch.setattr(mlx_backend, "eval_in_lockstep", lambda marks, out: (
        seen.append([len(m) for m in marks]), lockstep(marks, out), seen.append([len(m) for m in marks])))
    two = backend.unet(lat, 321.0, ctx)
    layers = sum(len(b.resnets) for b in [*backend.unet_model.down_blocks, *backend.unet_model.up_blocks]) + 2
    assert seen[0][0] == seen[0][1] >= layers and seen[1] == [0, 0]
    rel = report("UNet batch of 3 on two CPU streams in lockstep vs one stream (rel)",
                 float(mx.abs(one - two).max()) / float(mx.abs(one).max()))
    assert rel < 1e-5
    shared = backend.unet(lat[:1], 321.0, ctx[:1])  # batch 1: nothing to split
    np.testing.assert_allclose(np.array(shared), np.array(one[:1]), atol=1e-5)


def test_cpu_stream_counts_are_validated(sd1, pipelines, monkeypatch):
    from mlx_stablefused.backends.mlx.cpu_streams import ENV_STREAMS, default_stream_count, split_sizes

    p = pipelines.pipeline(TextToImageDiffusion, sd1[1])  # refused before anything changes
    with pytest.raises(ValueError, match="at least 1"):
        p.set_cpu_streams(0)
    monkeypatch.setenv(ENV_STREAMS, "two")
    with pytest.raises(ValueError, match=ENV_STREAMS):
        default_stream_count()
    monkeypatch.setenv(ENV_STREAMS, "3")
    assert default_stream_count() == 3
    assert split_sizes(7, 3) == [3, 2, 2] and split_sizes(2, 5) == [1, 1]


def test_malloc_tuning_reports_and_can_be_disabled(monkeypatch):
    import sys

    from mlx_stablefused import _malloc

    monkeypatch.setenv("MLX_STABLEFUSED_NO_MALLOC_TUNING", "1")
    assert _malloc.keep_freed_memory() == "disabled by MLX_STABLEFUSED_NO_MALLOC_TUNING"
    monkeypatch.delenv("MLX_STABLEFUSED_NO_MALLOC_TUNING")
    status = _malloc.keep_freed_memory()
    if sys.platform.startswith("linux"):
        assert status == "glibc keeps freed memory (no trimming, no mmap'd blocks)" or status == "not glibc: left alone"
    else:
        assert status == "not needed (not Linux)"
