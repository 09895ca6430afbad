"""The command line: exit codes, outputs, determinism by seed, and the offline demo model."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mlx_stablefused.cli import main

FAST = ["--model", "demo:tiny-random", "--steps", "2", "--height", "64", "--width", "64", "--no-progress"]


def test_txt2img_demo_is_deterministic_by_seed(tmp_path, capsys):
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    assert main(["txt2img", "--prompt", "a red boat", "--output", str(a), "--seed", "3", *FAST]) == 0
    assert "demo model" in capsys.readouterr().err  # honestly labelled
    assert main(["txt2img", "--prompt", "a red boat", "--output", str(b), "--seed", "3", *FAST]) == 0
    assert main(["txt2img", "--prompt", "a red boat", "--output", str(c), "--seed", "4", *FAST]) == 0
    assert Image.open(a).size == (64, 64)
    assert a.read_bytes() == b.read_bytes()
    assert np.abs(np.asarray(Image.open(a), float) - np.asarray(Image.open(c), float)).max() > 0
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


def test_several_images_get_numbered_files(tmp_path):
    out = tmp_path / "img.png"
    assert main(["txt2img", "--prompt", "x", "--output", str(out), "--num-images", "2", *FAST]) == 0
    assert (tmp_path / "img-0.png").is_file() and (tmp_path / "img-1.png").is_file()


def test_real_model_and_scheduler_flags(sd1, tmp_path):
    _, root = sd1
    out = tmp_path / "o.jpg"
    assert main(["txt2img", "--prompt", "x", "--scheduler", "euler", "--output", str(out), *FAST,
                 "--model", str(root)]) == 0
    assert Image.open(out).format == "JPEG"


@pytest.mark.parametrize("argv,message", [
    (["--height", "65"], "multiple of 8"),
    (["--scheduler", "nope"], "valid names"),
    (["--model", "/no/such/folder"], "does not exist"),
])
def test_bad_input_exits_1_with_a_message(tmp_path, capsys, argv, message):
    args = ["txt2img", "--prompt", "x", "--output", str(tmp_path / "x.png"), *FAST, *argv]
    assert main(args) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_torch_backend_gives_the_same_file_as_mlx(tmp_path):
    a, b = tmp_path / "mlx.png", tmp_path / "torch.png"
    assert main(["txt2img", "--prompt", "a boat", "--output", str(a), *FAST]) == 0
    assert main(["txt2img", "--prompt", "a boat", "--output", str(b), *FAST, "--backend", "torch", "--device",
                 "cpu"]) == 0
    diff = np.abs(np.asarray(Image.open(a), float) - np.asarray(Image.open(b), float))
    assert diff.max() <= 1  # uint8 rounding of float images that agree to ~1e-5


def test_default_model_falls_back_to_the_labelled_demo_when_offline(tmp_path, capsys, monkeypatch):
    import huggingface_hub

    def offline(*a, **k):
        raise ConnectionError("network unreachable")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", offline)
    monkeypatch.setattr("mlx_stablefused.hub_access.offline_reason", lambda *a, **k: None)  # the probe says online
    out = tmp_path / "d.png"
    assert main(["txt2img", "--prompt", "x", "--output", str(out), *FAST[2:]]) == 0
    err = capsys.readouterr().err
    assert "unavailable" in err and "demo model" in err and "noise" in err
    assert out.is_file()


def test_usage_errors_exit_2():
    with pytest.raises(SystemExit) as e:
        main(["txt2img"])
    assert e.value.code == 2


def test_module_entry_point_runs(tmp_path):
    out = tmp_path / "m.png"
    proc = subprocess.run([sys.executable, "-m", "mlx_stablefused.cli", "txt2img", "--prompt", "hi",
                           "--output", str(out), *FAST], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert out.is_file()


def _image_file(path, size=(64, 64)):
    import numpy as np

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return str(path)


def _mask_file(path):
    import numpy as np

    m = np.zeros((64, 64), np.uint8)
    m[16:48, 16:48] = 255
    Image.fromarray(m).save(path)
    return str(path)


def test_img2img_and_inpaint_subcommands(tmp_path):
    src = _image_file(tmp_path / "in.png")
    mask = _mask_file(tmp_path / "mask.png")
    out1, out2 = tmp_path / "i2i.png", tmp_path / "inp.png"
    assert main(["img2img", "--prompt", "x", "--image", src, "--strength", "0.5", "--output", str(out1), *FAST]) == 0
    assert main(["inpaint", "--prompt", "x", "--image", src, "--mask", mask, "--output", str(out2), *FAST]) == 0
    assert Image.open(out1).size == (64, 64) and Image.open(out2).size == (64, 64)
    inpainted, original = np.asarray(Image.open(out2), float), np.asarray(Image.open(src), float)
    assert np.abs(inpainted - original)[16:48, 16:48].mean() > np.abs(inpainted - original)[:8, :8].mean()


def test_walk_and_interpolate_subcommands(tmp_path):
    import imageio.v2 as imageio

    src = _image_file(tmp_path / "in.png")
    gif, mp4 = tmp_path / "walk.gif", tmp_path / "interp.mp4"
    assert main(["walk", "--prompt", "a", "b", "--image", src, "--walk-type", "left", "up", "--num-inpainting-steps",
                 "2", "--interpolation-steps", "3", "--translation", "16", "--output", str(gif), *FAST]) == 0
    with Image.open(gif) as im:
        assert im.n_frames == 6
    assert main(["interpolate", "--prompt", "a", "b", "c", "--interpolation-steps", "2", "--output", str(mp4),
                 *FAST]) == 0
    assert imageio.get_reader(str(mp4)).count_frames() == 5


def test_video_subcommand(tmp_path):
    import imageio.v2 as imageio

    out = tmp_path / "v.mp4"
    assert main(["video", "--prompt", "a boat", "--frames", "5", "--output", str(out), *FAST]) == 0
    assert imageio.get_reader(str(out)).count_frames() == 5
    long = tmp_path / "long.gif"  # past the adapter's 32 frames: context windows over frames (small frames)
    assert main(["video", "--prompt", "a boat", "--frames", "36", "--context-length", "8", "--output", str(long),
                 *FAST, "--height", "32", "--width", "32"]) == 0
    with Image.open(long) as im:
        assert im.n_frames == 36


@pytest.mark.parametrize("argv,message", [
    (["video", "--prompt", "x", "--frames", "40"], "maximum of 32"),
    (["video", "--prompt", "x", "--motion-adapter", "/no/such/adapter"], "not a file, a folder or a hub repo id"),
    (["img2img", "--prompt", "x", "--image", "/no/such.png"], "No such file"),
    (["img2img", "--prompt", "x", "--image", "{img}", "--strength", "2"], "strength"),
    (["inpaint", "--prompt", "x", "--image", "{img}", "--mask", "{img}", "--mode", "unet"], "9-channel"),
    (["walk", "--prompt", "x", "--image", "{img}", "--walk-type", "sideways"], "unknown walk type"),
    (["interpolate", "--prompt", "only-one"], "at least two"),
])
def test_subcommand_errors_exit_1(tmp_path, capsys, argv, message):
    img = _image_file(tmp_path / "in.png")
    argv = [a.replace("{img}", img) for a in argv]
    output = tmp_path / ("o.mp4" if argv[0] in ("walk", "interpolate", "video") else "o.png")  # the right kind
    assert main([*argv, "--output", str(output), *FAST]) == 1
    assert message in capsys.readouterr().err
    assert not output.exists()


def test_ip_adapter_flags(tmp_path, capsys):
    """--ip-adapter (the demo adapter) with an image prompt: scale 0 gives the plain image (tested in
    test_ip_adapter.py), scale 1 another; a lone flag or a missing image is refused before a model loads."""
    img = _image_file(tmp_path / "prompt.png", (40, 56))
    zero, steered = tmp_path / "zero.png", tmp_path / "steered.png"
    adapter = ["--ip-adapter", "demo:ip-adapter", "--ip-adapter-image", img]
    assert main(["txt2img", "--prompt", "a boat", "--output", str(zero), *FAST, *adapter,
                 "--ip-adapter-scale", "0"]) == 0
    assert main(["txt2img", "--prompt", "a boat", "--output", str(steered), *FAST, *adapter]) == 0
    zero, steered = (np.asarray(Image.open(p), dtype=np.int16) for p in (zero, steered))
    assert np.abs(steered - zero).max() > 10
    for argv, message in ((["--ip-adapter", "demo:ip-adapter"], "--ip-adapter: needs --ip-adapter-image"),
                          (["--ip-adapter-image", img], "--ip-adapter-image: needs --ip-adapter"),
                          (["--ip-adapter", "demo:ip-adapter", "--ip-adapter-image", "/no/such.png"],
                           "--ip-adapter-image: No such file")):
        capsys.readouterr()
        assert main(["txt2img", "--prompt", "x", "--output", str(tmp_path / "x.png"), *FAST, *argv]) == 1
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
