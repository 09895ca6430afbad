"""The command line refuses bad values before any work: one line naming the flag, exit 1, no file written.

Most cases call ``main`` in-process with every subcommand's handler replaced by one that fails the test, so a
refusal provably comes before any model is looked up or loaded; a handful go through the real entry point.
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_stablefused import __version__, cli
from mlx_stablefused.errors import ModelSourceError, UnsupportedModelError, WeightLoadError
from mlx_stablefused.schedulers import SCHEDULER_NAMES

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--model", "demo:tiny-random", "--steps", "2", "--height", "64", "--width", "64", "--no-progress"]


@pytest.fixture
def no_work(monkeypatch):
    """Every subcommand's handler fails the test: what is refused must be refused before it runs."""

    def must_not_run(args):
        raise AssertionError(f"{args.command} started work on input that should have been refused")

    for name in cli.HANDLERS:
        monkeypatch.setitem(cli.HANDLERS, name, must_not_run)


def refused(capsys, argv, flag, folder, notice=False):
    """``main(argv)`` exits 1 with exactly one stderr line naming ``flag``, and ``folder`` stays empty.

    ``notice``: the demo model's notice may come first (the refusal came from the API, after it)."""
    before = sorted(folder.iterdir())
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    if notice:
        assert err.startswith("[mlx-stablefused] Using the built-in offline demo model"), err
        err = err.split("\n", 1)[1]
    assert err.count("\n") == 1 and err.startswith("mlx-stablefused: error: "), err
    assert flag in err and "Traceback" not in err, err
    assert sorted(folder.iterdir()) == before
    return err


IMAGE = ["txt2img", "--prompt", "x"]
VIDEO = ["video", "--prompt", "x"]
BAD_VALUES = [  # argv, the flag the message must name
    (IMAGE + ["--height", "0"], "--height"),
    (IMAGE + ["--width", "0"], "--width"),
    (IMAGE + ["--height", "-64"], "--height"),
    (IMAGE + ["--height", "64.5"], "--height"),
    (IMAGE + ["--height", "60"], "--height"),  # not a multiple of 8: refused before the model loads
    (IMAGE + ["--width", "abc"], "--width"),
    (IMAGE + ["--steps", "0"], "--steps"),
    (IMAGE + ["--steps", "-3"], "--steps"),
    (IMAGE + ["--seed", "-1"], "--seed"),
    (IMAGE + ["--guidance", "nan"], "--guidance"),
    (IMAGE + ["--guidance", "inf"], "--guidance"),
    (IMAGE + ["--guidance", "seven"], "--guidance"),
    (IMAGE + ["--guidance-rescale=-inf"], "--guidance-rescale"),
    (IMAGE + ["--num-images", "0"], "--num-images"),
    (IMAGE + ["--scheduler", "nope"], "--scheduler"),
    (["img2img", "--prompt", "x", "--image", "in.png", "--strength", "2"], "--strength"),
    (["img2img", "--prompt", "x", "--image", "in.png", "--strength", "-0.1"], "--strength"),
    (["img2img", "--prompt", "x", "--image", "in.png", "--strength", "nan"], "--strength"),
    (["inpaint", "--prompt", "x", "--image", "a.png", "--mask", "m.png", "--start-step", "-1"], "--start-step"),
    (["walk", "--prompt", "x", "--image", "a.png", "--start-step", "x"], "--start-step"),
    (VIDEO + ["--fps", "0"], "--fps"),
    (VIDEO + ["--fps", "-8"], "--fps"),
    (VIDEO + ["--frames", "0"], "--frames"),
    (VIDEO + ["--context-length", "0"], "--context-length"),
    (VIDEO + ["--context-stride", "0"], "--context-stride"),
    (["walk", "--prompt", "x", "--image", "a.png", "--walk-type", "sideways"], "--walk-type"),
    (["walk", "--prompt", "x", "--image", "a.png", "--translation", "0"], "--translation"),
    (["walk", "--prompt", "x", "--image", "a.png", "--num-inpainting-steps", "0"], "--num-inpainting-steps"),
    (["walk", "--prompt", "x", "--image", "a.png", "--interpolation-steps", "0"], "--interpolation-steps"),
    (["interpolate", "--prompt", "a", "b", "--interpolation-steps", "4", "0"], "--interpolation-steps"),
    (["interpolate", "--prompt", "a", "b", "--batch-size", "0"], "--batch-size"),
    (["interpolate", "--prompt", "a", "b", "--fps", "0"], "--fps"),
]


@pytest.mark.parametrize("argv,flag", BAD_VALUES, ids=[" ".join(a[-2:]) for a, _ in BAD_VALUES])
def test_bad_values_are_refused_naming_the_flag(tmp_path, capsys, no_work, argv, flag):
    out = tmp_path / ("o.mp4" if argv[0] in cli.VIDEO_COMMANDS else "o.png")
    refused(capsys, [*argv, "--output", str(out)], flag, tmp_path)


def test_a_refused_value_matches_the_api_rule(tmp_path, capsys, no_work):
    from mlx_stablefused.pipelines.inputs import positive_int

    err = refused(capsys, IMAGE + ["--steps", "0", "--output", str(tmp_path / "o.png")], "--steps", tmp_path)
    with pytest.raises(ValueError) as api:
        positive_int(0, "--steps")
    assert str(api.value) in err  # one rule, one message


BAD_OUTPUTS = [  # subcommand argv, output name, what the message says
    (IMAGE, "out.xyz", ".xyz"),
    (IMAGE, "out", "no extension"),
    (IMAGE, "out.mp4", "a video extension"),
    (VIDEO, "out.png", "an image extension"),
    (["interpolate", "--prompt", "a", "b"], "out.jpg", "an image extension"),
    (["walk", "--prompt", "a", "--image", "in.png"], "out.xyz", ".xyz"),
]


@pytest.mark.parametrize("argv,name,message", BAD_OUTPUTS, ids=[f"{a[0]}-{n}" for a, n, _ in BAD_OUTPUTS])
def test_output_extension_must_fit_the_subcommand(tmp_path, capsys, no_work, argv, name, message):
    err = refused(capsys, [*argv, "--output", str(tmp_path / name)], "--output", tmp_path)
    assert message in err


def test_video_without_ffmpeg_is_refused_but_gif_is_not_checked(tmp_path, capsys, no_work, monkeypatch):
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # as if imageio-ffmpeg were not installed
    err = refused(capsys, VIDEO + ["--output", str(tmp_path / "v.mp4")], "--output", tmp_path)
    assert "imageio-ffmpeg" in err and ".gif" in err
    with pytest.raises(AssertionError, match="started work"):  # a gif needs only Pillow: it gets to work
        cli.main(VIDEO + ["--output", str(tmp_path / "v.gif")])


@pytest.mark.parametrize("name,fmt", [("o.tif", "TIFF"), ("o.JPEG", "JPEG"), ("o.webp", "WEBP")])
def test_every_accepted_image_extension_is_written_in_its_format(tmp_path, name, fmt):
    from PIL import Image

    assert cli.main(IMAGE + ["--output", str(tmp_path / name), *FAST, "--height", "32", "--width", "32"]) == 0
    with Image.open(tmp_path / name) as im:
        assert im.format == fmt


def test_output_that_is_a_directory_is_refused(tmp_path, capsys, no_work):
    (tmp_path / "taken.png").mkdir()
    refused(capsys, IMAGE + ["--output", str(tmp_path)], "is a directory", tmp_path)
    refused(capsys, IMAGE + ["--output", str(tmp_path / "taken.png")], "is a directory", tmp_path)
    (tmp_path / "img-1.png").mkdir()  # several images: every numbered file is checked
    refused(capsys, IMAGE + ["--num-images", "2", "--output", str(tmp_path / "img.png")], "--output", tmp_path)


def test_output_under_a_file_is_refused(tmp_path, capsys, no_work):
    (tmp_path / "file").write_text("")
    err = refused(capsys, IMAGE + ["--output", str(tmp_path / "file" / "sub" / "o.png")], "--output", tmp_path)
    assert "not a folder" in err


def test_output_in_a_read_only_folder_is_refused(tmp_path, capsys, no_work):
    if os.geteuid() == 0:  # root writes through permissions: use a folder no one can create files in
        folder = Path("/proc")
    else:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o500)
    try:
        err = refused(capsys, IMAGE + ["--output", str(folder / "o.png")], "--output", tmp_path)
    finally:
        if folder != Path("/proc"):
            folder.chmod(0o700)
    assert "cannot create a file" in err and not (folder / "o.png").exists()


def test_input_images_are_checked_before_any_model(tmp_path, capsys, no_work):
    (tmp_path / "not-an-image.png").write_text("hello")
    (tmp_path / "folder.png").mkdir()
    good = tmp_path / "good.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(good)
    out = str(tmp_path / "o.png")
    for image, mask, flag, message in [("missing.png", None, "--image", "No such file"),
                                       ("not-an-image.png", None, "--image", "could not read"),
                                       ("folder.png", None, "--image", "--image"),
                                       (good, "missing.png", "--mask", "No such file")]:
        argv = ["inpaint", "--mask", str(tmp_path / mask)] if mask else ["img2img"]
        err = refused(capsys, [*argv, "--prompt", "x", "--image", str(tmp_path / image), "--output", out], flag,
                      tmp_path)
        assert message in err


def test_unwritable_model_cache_is_one_line_naming_it(tmp_path, capsys, monkeypatch):
    if os.geteuid() == 0:
        cache = Path("/proc/msf-cache")  # root writes through permissions; no one creates folders in /proc
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
        cache = tmp_path / "ro" / "cache"
    monkeypatch.setenv("MLX_STABLEFUSED_CACHE", str(cache))
    assert cli.main(IMAGE + ["--output", str(tmp_path / "o.png"), *FAST]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "MLX_STABLEFUSED_CACHE" in errors[0] and "Traceback" not in err, err
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("start,flag,message", [
    (["--strength", "0"], "--strength", "leaves no denoising step"),
    (["--strength", "0.1", "--steps", "5"], "--strength", "leaves no denoising step"),
    (["--start-step", "5", "--steps", "5"], "--start-step", "[0, 4]"),
])
def test_a_start_that_leaves_no_step_is_refused_before_any_model(tmp_path, capsys, monkeypatch, start, flag,
                                                                  message):
    from PIL import Image

    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("mlx_stablefused.pipelines.image_to_image.ImageToImageDiffusion.__init__", no_model)
    Image.new("RGB", (64, 64)).save(tmp_path / "in.png")
    argv = ["img2img", "--prompt", "x", "--image", str(tmp_path / "in.png"), "--model", "demo:tiny-random",
            "--output", str(tmp_path / "o.png"), *start]
    err = refused(capsys, argv, flag, tmp_path)
    assert message in err


@pytest.mark.parametrize("argv,flag", [
    (["--device", "cuda"], "--device"),  # mlx runs on gpu or cpu
    (["--backend", "torch", "--device", "gpu"], "--device"),
    (["--backend", "torch", "--device", "tpu"], "--device"),
])
def test_unknown_device_for_the_backend_is_refused(tmp_path, capsys, no_work, argv, flag):
    refused(capsys, IMAGE + argv + ["--output", str(tmp_path / "o.png")], flag, tmp_path)


@pytest.mark.parametrize("error", [ValueError("bad\nvalue"), ModelSourceError("no such model"),
                                   WeightLoadError("truncated"), UnsupportedModelError("no such block"),
                                   NotImplementedError("not ported"), TypeError("prompt must be a string")])
def test_expected_errors_become_one_line_exit_1(tmp_path, capsys, monkeypatch, error):
    def fail(args):
        raise error

    monkeypatch.setitem(cli.HANDLERS, "txt2img", fail)
    err = refused(capsys, IMAGE + ["--output", str(tmp_path / "o.png")], str(error).split("\n")[0], tmp_path)
    assert type(error).__name__ not in err


@pytest.mark.parametrize("argv,flag,parameter", [
    (VIDEO + ["--output", "{out}.gif", *FAST, "--frames", "33", "--height", "32", "--width", "32"],
     "--context-length", "enable_context_windows"),
])
def test_api_refusals_name_the_flag_not_the_parameter(tmp_path, capsys, argv, flag, parameter):
    argv = [a.replace("{out}", str(tmp_path / "o")) for a in argv]
    err = refused(capsys, argv, flag, tmp_path, notice=True)
    assert parameter not in err


def test_ctrl_c_exits_130_with_nothing_half_written(tmp_path, capsys, monkeypatch):
    from PIL import Image

    def interrupted_mid_write(self, fp, *a, **k):
        Path(fp).write_bytes(b"half an image")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupted_mid_write)
    assert cli.main(IMAGE + ["--output", str(tmp_path / "o.png"), *FAST]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_usage_errors_still_exit_2(capsys):
    for argv in (["txt2img"], ["txt2img", "--prompt", "x", "--no-such-flag"], ["nope"],
                 ["inpaint", "--prompt", "x", "--image", "a", "--mask", "m", "--mode", "paint"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2
    capsys.readouterr()


# ------------------------------------------------------------------------------------------- help
def _help(*argv):
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--help"])
    assert e.value.code == 0


def _options(command):
    """The options of one subcommand's parser (argparse keeps them on its private ``_actions``)."""
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return [a for a in sub.choices[command]._actions if a.option_strings and not a.required]


def test_help_shows_defaults_valid_values_and_no_markup(capsys):
    for command in (*cli.HANDLERS, None):
        _help(*([command] if command else []))
        text = capsys.readouterr().out
        assert "``" not in text and ":func:" not in text and ":class:" not in text, command
        for action in _options(command) if command else []:
            if action.dest not in ("help", "no_progress", "overwrite"):  # flags: on or off
                assert "default" in action.help or action.default is not None, (command, action.dest)
    _help("txt2img")
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in SCHEDULER_NAMES)
    assert "(default: 7.5)" in text and "(default: 0)" in text and "(default: output.png)" in text
    _help("video")
    assert "demo:motion" in " ".join(capsys.readouterr().out.split())


# ------------------------------------------------------------------------ the real entry point
def console(*argv, shim=""):
    """Run the command as a user does (this checkout's copy), optionally after ``shim`` Python lines."""
    code = f"import sys\n{shim}\nfrom mlx_stablefused.cli import main\nsys.exit(main())"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, timeout=120)


def assert_console_refusal(proc, flag, folder):
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlx-stablefused: error: ") and flag in lines[0], proc.stderr
    assert list(folder.iterdir()) == []


def test_console_refuses_bad_values_and_outputs(tmp_path):
    out = str(tmp_path / "o.png")
    assert_console_refusal(console("txt2img", "--prompt", "x", "--height", "0", "--output", out), "--height", tmp_path)
    assert_console_refusal(console("video", "--prompt", "x", "--output", out), "--output", tmp_path)
    assert_console_refusal(console("txt2img", "--prompt", "x", "--output", str(tmp_path / "o.xyz")), "--output",
                           tmp_path)


def test_console_torch_backend_without_torch(tmp_path):
    proc = console("txt2img", "--prompt", "x", "--backend", "torch", "--output", str(tmp_path / "o.png"),
                   shim="sys.modules['torch'] = None  # as if PyTorch were not installed")
    assert_console_refusal(proc, "--backend torch", tmp_path)
    assert "not installed" in proc.stderr


def test_mlx_gpu_without_a_gpu_backend(tmp_path, capsys, no_work):
    import mlx.core as mx

    if mx.is_available(mx.gpu):
        pytest.skip("this MLX build has a GPU")
    refused(capsys, IMAGE + ["--device", "gpu", "--output", str(tmp_path / "o.png")], "--device gpu", tmp_path)


def test_console_cuda_device_without_cuda(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = console("txt2img", "--prompt", "x", "--backend", "torch", "--device", "cuda",
                   "--output", str(tmp_path / "o.png"))
    assert_console_refusal(proc, "--device cuda", tmp_path)


def test_console_version():
    proc = console("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"mlx-stablefused {__version__}"


def test_console_refuses_sizes_before_loading_and_impossible_ones_before_work(tmp_path):
    out = str(tmp_path / "o.png")
    assert_console_refusal(console("txt2img", "--prompt", "x", "--height", "100", "--output", out), "--height",
                           tmp_path)
    proc = console("txt2img", "--prompt", "x", "--height", "65536", "--width", "65536", "--output", out)
    assert_console_refusal(proc, "--height x --width = 65536x65536", tmp_path)
    assert "MLX_STABLEFUSED_MAX_PIXELS" in proc.stderr


def test_a_request_too_big_for_memory_names_the_flags_that_fit_it(tmp_path, capsys, monkeypatch):
    from mlx_stablefused.backends.mlx.backend import MLXBackend

    monkeypatch.setattr(MLXBackend, "available_memory", lambda self: 3 * 1024 ** 3)
    monkeypatch.setattr(MLXBackend, "fused_attention", property(lambda self: False))
    monkeypatch.setattr(MLXBackend, "attention_slice_bytes", property(lambda self: None))  # whole score matrices
    argv = IMAGE + ["--model", "demo:tiny-random", "--height", "2048", "--width", "2048", "--output",
                    str(tmp_path / "o.png")]
    err = refused(capsys, argv, "--attention-slicing", tmp_path, notice=True)
    assert "--height=2048, --width=2048 needs at least" in err and "it would fit with --attention-slicing" in err
