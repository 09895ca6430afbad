"""A run whose numbers blow up stops with an error naming the step (never a black image), and every file
and folder written atomically gets the permissions a plain open() / mkdir() would give."""

import os
import stat

import numpy as np
import pytest

from mlx_stablefused import NonFiniteError, TextToImageDiffusion, cli, pil_to_gif  # noqa: F401
from mlx_stablefused.checkpoint_io import atomic_directory, write_json
from mlx_stablefused.utils.images import numpy_to_pil

ARGS = dict(prompt="a cat", image_height=64, image_width=64, num_inference_steps=4, seed=0, output_type="np")


def test_latents_turning_non_finite_stop_the_run_naming_the_step(sd1, pipelines, backend_name, monkeypatch):
    _, root = sd1
    pipe = pipelines.pipeline(TextToImageDiffusion, root, backend_name, scheduler="ddim")
    real, calls = pipe.backend.unet, []

    def blows_up_on_the_third_call(latent, t, cond):
        calls.append(t)
        out = real(latent, t, cond)
        return out * float("inf") if len(calls) == 3 else out

    monkeypatch.setattr(pipe.backend, "unet", blows_up_on_the_third_call)
    decoded = []
    monkeypatch.setattr(pipe.backend, "vae_decode", lambda z: decoded.append(z))
    with pytest.raises(NonFiniteError, match=r"latents became NaN or infinite at step 3 of 4 \(timestep \d+\)"):
        pipe(**ARGS)
    assert len(calls) == 3 and decoded == []  # stopped at once, nothing decoded


def test_non_finite_decoded_images_are_an_error_not_a_black_image(sd1, pipelines, backend_name, monkeypatch):
    _, root = sd1
    pipe = pipelines.pipeline(TextToImageDiffusion, root, backend_name, scheduler="ddim")
    real = pipe.backend.vae_decode
    monkeypatch.setattr(pipe.backend, "vae_decode", lambda z: real(z) * float("nan"))
    with pytest.raises(NonFiniteError, match="decoded images became NaN or infinite"):
        pipe(**dict(ARGS, num_inference_steps=1))


def test_cli_reports_a_blown_up_run_in_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    from mlx_stablefused.pipelines import denoise

    monkeypatch.setattr(denoise.Guidance, "combine", lambda self, backend, prediction: prediction * float("nan"))
    out = tmp_path / "out.png"
    code = cli.main(["txt2img", "--model", "demo:tiny-random", "--prompt", "x", "--height", "64", "--width", "64",
                     "--steps", "2", "--output", str(out)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mlx-stablefused:")]
    assert code == 1 and len(err) == 1 and "NaN or infinite at step 1 of" in err[0], err  # (the bar aside)
    assert "Traceback" not in err[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_get_plain_open_permissions(tmp_path, umask):
    old = os.umask(umask)
    try:
        with open(tmp_path / "plain.txt", "w") as f:  # what a plain open() gives, the reference
            f.write("x")
        os.mkdir(tmp_path / "plain-dir")
        write_json(tmp_path / "atomic.json", {"a": 1})
        with atomic_directory(tmp_path / "atomic-dir") as d:
            write_json(d / "inner.json", {"b": 2})
        gif = pil_to_gif(numpy_to_pil(np.zeros((2, 8, 8, 3), np.float32)), tmp_path / "anim.gif", fps=4)
    finally:
        os.umask(old)

    def mode(p):
        return stat.S_IMODE(os.stat(p).st_mode)

    assert mode(tmp_path / "atomic.json") == mode(tmp_path / "plain.txt") == 0o666 & ~umask
    assert mode(gif) == 0o666 & ~umask
    assert mode(tmp_path / "atomic-dir" / "inner.json") == 0o666 & ~umask
    assert mode(tmp_path / "atomic-dir") == mode(tmp_path / "plain-dir") == 0o777 & ~umask


def test_a_torch_latent_that_requires_grad_is_accepted(sd1, pipelines):
    import torch

    _, root = sd1
    pipe = pipelines.pipeline(TextToImageDiffusion, root, "torch", scheduler="ddim")
    noise = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
    args = dict(prompt="a cat", num_inference_steps=2, output_type="np")
    expected = pipe(latent=noise, **args)
    np.testing.assert_array_equal(pipe(latent=torch.from_numpy(noise).requires_grad_(True), **args), expected)


# ------------------------------------------------------------------------ memory (issue 21, item 1)
def _giant_request_is_refused_without_allocating(pipe, monkeypatch):
    import tracemalloc

    monkeypatch.setenv("MLX_STABLEFUSED_MAX_PIXELS", str(2 ** 40))  # past the cap: the estimate must refuse
    monkeypatch.setattr(pipe.backend, "unet", lambda *a: pytest.fail("the UNet ran on a refused request"))
    tracemalloc.start()
    try:
        with pytest.raises(MemoryError) as caught:
            pipe(**dict(ARGS, image_height=65536, image_width=65536))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, f"{peak} bytes allocated before the refusal"  # no latent (1 GB) was drawn
    return str(caught.value)


def test_a_request_that_cannot_fit_is_refused_before_any_work(sd1, pipelines, backend_name, monkeypatch):
    _, root = sd1
    pipe = pipelines.pipeline(TextToImageDiffusion, root, backend_name, scheduler="ddim")
    message = _giant_request_is_refused_without_allocating(pipe, monkeypatch)
    assert "image_height=65536, image_width=65536 needs at least" in message and "is available" in message
    assert "no option makes it fit" in message
    monkeypatch.delenv("MLX_STABLEFUSED_MAX_PIXELS")
    with pytest.raises(ValueError, match=r"image_height x image_width = 65536x65536 is 4295 MP, over the cap of 67 MP"):
        pipe(**dict(ARGS, image_height=65536, image_width=65536))


def test_the_refusal_names_the_options_that_would_make_it_fit(sd1, pipelines, monkeypatch):
    """With 3 GB free, 2048x2048 with whole score matrices needs both the UNet's attention sliced and the VAE
    tiled (its mid-block attention alone would take 16 GB)."""
    from mlx_stablefused.memory_estimate import Request, estimate, peak

    _, root = sd1
    pipe = TextToImageDiffusion.from_pipeline(pipelines.pipeline(TextToImageDiffusion, root, "mlx"))
    backend = pipe.backend
    monkeypatch.setattr(type(backend), "available_memory", lambda self: 3 * 1024 ** 3)
    monkeypatch.setattr(type(backend), "fused_attention", property(lambda self: False))
    monkeypatch.setattr(type(backend), "attention_slice_bytes", property(lambda self: None))  # whole matrices
    parts = estimate(backend.unet_config, backend.vae_config, Request(2048, 2048, 1), 4, False)
    assert min(parts["attention"], parts["vae"]) > 3 * 1024 ** 3  # the premise of the test
    with pytest.raises(MemoryError, match=r"it would fit with enable_tiling\(\) \+ enable_attention_slicing\(\)$"):
        pipe.check_memory(2048, 2048, 1)
    pipe.enable_attention_slicing()
    with pytest.raises(MemoryError, match=r"largest part: VAE decoder activations.*it would fit with enable_tiling"):
        pipe.check_memory(2048, 2048, 1)
    pipe.enable_tiling()
    pipe.check_memory(2048, 2048, 1)  # now it fits
    both = Request(2048, 2048, 1, attention_chunk=1024, tile=pipe.tiling.sample_size)
    assert peak(estimate(backend.unet_config, backend.vae_config, both, 4, False)) < 3 * 1024 ** 3
    fused = estimate(backend.unet_config, backend.vae_config, Request(2048, 2048, 1), 4, True)
    assert fused["attention"] == 0 and fused["vae"] < parts["vae"]  # Metal / CUDA: no score matrices


def test_the_refusal_knows_mlx_on_the_cpu_always_slices_its_attention(sd1, pipelines, monkeypatch):
    """MLX's CPU build holds at most CPU_SLICE_SCORE_BYTES of scores a slice whatever the pipeline asks, so
    its bound and advice leave attention slicing out: at 2048x2048 with 400 MB free only VAE tiling is named (the
    tiny VAE's top-resolution maps; whole score matrices would need 17 GB in its mid block alone)."""
    from mlx_stablefused.backends.mlx import cpu_math
    from mlx_stablefused.memory_estimate import Request, estimate

    _, root = sd1
    pipe = TextToImageDiffusion.from_pipeline(pipelines.pipeline(TextToImageDiffusion, root, "mlx"))
    backend = pipe.backend
    assert backend.attention_slice_bytes == cpu_math.CPU_SLICE_SCORE_BYTES  # the test machine is a CPU
    monkeypatch.setattr(type(backend), "available_memory", lambda self: 400 * 1024 ** 2)
    whole = estimate(backend.unet_config, backend.vae_config, Request(2048, 2048, 1), 4, False)
    sliced = estimate(backend.unet_config, backend.vae_config, Request(2048, 2048, 1), 4, False,
                      cpu_math.CPU_SLICE_SCORE_BYTES)
    assert sliced["attention"] == cpu_math.CPU_SLICE_SCORE_BYTES < whole["attention"]
    assert whole["vae"] - sliced["vae"] > 15 * 1024 ** 3  # the VAE's 65536-token scores, 16 GB whole
    with pytest.raises(MemoryError, match=r"largest part: VAE decoder activations.*it would fit with "
                                          r"enable_tiling\(\)$"):
        pipe.check_memory(2048, 2048, 1)
    pipe.enable_tiling()
    pipe.check_memory(2048, 2048, 1)


def test_the_pixel_cap_is_configurable_and_checked(monkeypatch):
    from mlx_stablefused.memory_estimate import check_pixel_cap

    monkeypatch.setenv("MLX_STABLEFUSED_MAX_PIXELS", "4096")
    with pytest.raises(ValueError, match="over the cap of 0 MP"):
        check_pixel_cap(128, 64)
    check_pixel_cap(64, 64)
    monkeypatch.setenv("MLX_STABLEFUSED_MAX_PIXELS", "lots")
    with pytest.raises(ValueError, match="MLX_STABLEFUSED_MAX_PIXELS='lots' must be a positive integer"):
        check_pixel_cap(64, 64)


# --------------------------------------------------------------------- offline (issue 21, item 5)
def test_offline_is_known_in_seconds_and_said_in_one_line(monkeypatch, capsys):
    import time

    from mlx_stablefused import hub_access
    from mlx_stablefused.cli import DEFAULT_HUB_MODEL, default_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_access.offline_reason() == "HF_HUB_OFFLINE is set"
    monkeypatch.setenv("HF_HOME", os.devnull + "-no-cache")  # nothing cached either
    start = time.perf_counter()
    assert default_model(None) == "demo:tiny-random"
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err.splitlines()
    assert err == [f"[mlx-stablefused] {DEFAULT_HUB_MODEL} is unavailable (offline: HF_HUB_OFFLINE is set; "
                   "not in the local cache)."], err
    assert elapsed < 5, elapsed  # a bound on waiting for retries, not a benchmark: the hub's own take ~23 s


def test_the_probe_refuses_an_unreachable_hub_without_retries(monkeypatch):
    import socket

    from mlx_stablefused import hub_access

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    attempts = []

    def refuse(address, timeout=None):
        attempts.append((address, timeout))
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(hub_access, "_last", None)
    assert hub_access.offline_reason() == "hub.invalid unreachable: Name or service not known"
    assert hub_access.offline_reason() == "hub.invalid unreachable: Name or service not known"
    assert attempts == [(("hub.invalid", 443), hub_access.PROBE_TIMEOUT_S)]  # one probe, remembered
    monkeypatch.setattr(hub_access, "_last", None)
    monkeypatch.setattr(socket, "create_connection", lambda address, timeout=None: _Closing())
    assert hub_access.offline_reason() is None


class _Closing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ------------------------------------------------------------------- progress (issue 21, item 8)
def test_progress_off_a_terminal_is_plain_lines_from_the_outer_bar_only(monkeypatch, capsys):
    from mlx_stablefused import progress

    monkeypatch.setattr(progress, "_is_terminal", lambda: False)
    monkeypatch.setattr(progress, "_in_notebook", lambda: False)
    with progress.progress_bar(8, "frames", unit="frame") as outer:
        for _ in range(8):
            with progress.progress_bar(3, "denoising", unit="step") as inner:
                for _ in range(3):
                    inner.update(1)
            outer.update(1)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert [line.split(",")[0] for line in lines] == ["frames: 2/8 frame (25%)", "frames: 4/8 frame (50%)",
                                                      "frames: 6/8 frame (75%)", "frames: 8/8 frame (100%)"]
    assert "\r" not in err and "\x1b" not in err and "denoising" not in err
    with progress.progress_bar(5, "hidden", enabled=False) as bar:
        bar.update(5)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("name,text", [("MLX_STABLEFUSED_CPU_STREAMS", "0"), ("MLX_STABLEFUSED_CPU_STREAMS", "1.5"),
                                       ("MLX_STABLEFUSED_DISTRIBUTED_TIMEOUT", "inf"),
                                       ("MLX_STABLEFUSED_DISTRIBUTED_TIMEOUT", "-3"),
                                       ("MLX_STABLEFUSED_MAX_PIXELS", "nan")])
def test_malformed_numeric_settings_are_refused_by_name(monkeypatch, name, text):
    from mlx_stablefused.backends.mlx.cpu_streams import default_stream_count
    from mlx_stablefused.distributed import timeout_seconds
    from mlx_stablefused.memory_estimate import max_pixels

    read = {"MLX_STABLEFUSED_CPU_STREAMS": default_stream_count, "MLX_STABLEFUSED_DISTRIBUTED_TIMEOUT": timeout_seconds,
            "MLX_STABLEFUSED_MAX_PIXELS": max_pixels}[name]
    monkeypatch.setenv(name, text)
    with pytest.raises(ValueError, match=f"{name}='{text}' must be a positive"):
        read()
    monkeypatch.setenv(name, "7")
    assert read() == 7
