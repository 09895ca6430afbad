"""The low-memory preset keeps the default path's images (up to the VAE's sample size), on both backends.

Its parts are each exact: the text encoder and the UNet re-read from the same files, attention sliced over queries,
one image at a time through the VAE (VAE tiling, inexact beyond the VAE's sample size, is not part of it).
The 8-bit UNet is measured apart.
"""

import numpy as np
import pytest
from helpers import max_abs_error, report

from mlx_stablefused import TextToImageDiffusion
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
    assert (low.settings.attention_chunk, low.decode_batch_size, low.release_text_encoder, low.release_unet) == \
        (24, 1, True, True)
    assert low.tiling is None  # tiling changes images beyond the VAE's sample size: the caller's choice
    out = low(**ARGS)
    if backend_name == "mlx":  # both networks were freed: the next call re-reads them from the converted files
        assert max_abs_error(low(**ARGS), expected) == 0
    assert report(f"{backend_name}: low-memory preset vs default (max abs, [0, 1] images)",
                  max_abs_error(out, expected)) < 1e-5
    low.enable_low_memory(False)  # back to the options chosen before it
    assert (low.settings.attention_chunk, low.decode_batch_size, low.tiling, low.release_text_encoder,
            low.release_unet, low.settings.bounded_unet_run_ahead) == (None, None, None, False, False, True)
    with pytest.raises(ValueError, match="unet_bits"):
        low.enable_low_memory(unet_bits=4)
    if backend_name == "torch":
        with pytest.raises(NotImplementedError, match="torch backend has no quantized path"):
            low.enable_low_memory(unet_bits=8)
    assert low.settings.attention_chunk is None  # refused before anything changed


@pytest.mark.slow  # its own model load; 8-bit closeness is also checked by default in test_performance_paths
def test_low_memory_8bit_unet_stays_close(sd1):
    """The 8-bit UNet is the preset's one inexact option: on its own load (quantizing changes the weights)."""
    plain = TextToImageDiffusion(sd1[1], progress=False, scheduler="ddim")
    expected = plain(**ARGS)
    plain.enable_low_memory(unet_bits=8)
    err = max_abs_error(plain(**ARGS), expected)
    assert 0 < report("low-memory preset with the 8-bit UNet vs fp32 (max abs)", err) < 0.02
    assert np.isfinite(err)


def test_cli_refuses_the_8bit_unet_on_torch_before_loading(capsys, tmp_path):
    from mlx_stablefused import cli

    argv = ["txt2img", "--prompt", "x", "--backend", "torch", "--low-memory-8bit-unet", "--output",
            str(tmp_path / "o.png")]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("mlx-stablefused: error: --low-memory-8bit-unet: the torch backend") and err.count("\n") == 1
    assert not list(tmp_path.iterdir())
