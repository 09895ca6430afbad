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


def test_default_model_falls_back_to_the_labelled_demo_when_offline(tmp_path, capsys, monkeypatch):
    import huggingface_hub

    def offline(*a, **k):
        raise ConnectionError("network unreachable")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", offline)
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
