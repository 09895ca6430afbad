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
