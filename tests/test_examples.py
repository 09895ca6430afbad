"""Each example script (one per stablefused notebook) runs on the offline demo model."""

import os
import subprocess
import sys
from pathlib import Path

import imageio.v2 as imageio
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
# The package is importable whether or not it was pip-installed.
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
FAST = ["--model", "demo:tiny-random", "--dtype", "float32", "--scheduler", "ddim", "--steps", "2", "--size", "64",
        "--fps", "4"]

CASES = {
    "text_to_image.py": ([], {"text_to_image.png": None, "text_to_image_denoising.mp4": 3}),
    "image_to_image.py": (["--start-step", "1"], {"image_to_image_input.png": None, "image_to_image.png": None,
                                                   "image_to_image_denoising.mp4": 2}),
    "inpaint.py": (["--walk-steps", "1", "--frames", "2"], {"inpaint.png": None, "inpaint_zoom_in.mp4": 2,
                                                            "inpaint_pan.mp4": 4}),
    "latent_walk.py": (["--frames", "2", "--similar", "2"], {"latent_walk_similar.png": None,
                                                             "latent_walk_story.mp4": 7}),
    "text_to_video.py": (["--frames", "5"], {"text_to_video.gif": 5, "text_to_video.mp4": 5,
                                             "text_to_video_batch_1.mp4": 5}),
    "controlnet.py": ([], {"controlnet_input.png": None, "controlnet_canny.png": None, "controlnet.png": (4 * 64, 64),
                       "controlnet_img2img.png": None}),
    "ip_adapter.py": (["--scales", "0", "1"], {"ip_adapter_reference.png": None, "ip_adapter_scales.png": (2 * 64, 64)}),
    "guidance_scale.py": (["--step-counts", "1", "2", "--scales", "-1.5", "0", "7.5"],  # grids: scales x rows
                          {"guidance_scale_prompts.png": (3 * 64, 2 * 64), "guidance_scale_steps.png": (3 * 64, 2 * 64)}),
}
# expected: file name -> None (an image), a frame count (gif, video), or an image size (w, h)


# the CLI tests run the demo IP-Adapter and ControlNet in-process; the scripts themselves under -m slow
SLOW_CASES = {"ip_adapter.py", "controlnet.py"}


@pytest.mark.parametrize("script", [pytest.param(s, marks=pytest.mark.slow) if s in SLOW_CASES else s
                                    for s in sorted(CASES)])
def test_example_runs_on_the_demo_model(script, tmp_path):
    extra, expected = CASES[script]
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *FAST, *extra, "--output-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "demo model" in proc.stderr
    for name, frames in expected.items():
        path = tmp_path / name
        assert path.is_file(), name
        if frames is None:
            Image.open(path).verify()
        elif isinstance(frames, tuple):
            with Image.open(path) as im:
                assert im.size == frames, name
        elif path.suffix == ".gif":
            with Image.open(path) as im:
                assert im.n_frames == frames, name
        else:
            reader = imageio.get_reader(str(path))
            assert reader.count_frames() == frames, name
            reader.close()


def test_examples_on_the_demo_model_get_small_defaults_and_say_so(tmp_path, capsys, monkeypatch):
    """Unset sizes, steps and frame counts: the notebook's values on a real model, small ones on the demo
    model (its images are noise), said in one line; flags the user gave are kept."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import _common

    def parse(*argv):
        p = _common.parser("x")
        p.add_argument("--frames", type=int, default=None)
        _common.defaults(p, frames=(16, 4))
        return p.parse_args([*argv, "--output-dir", str(tmp_path / "out")])

    built, _ = _common.setup(parse("--model", "demo:tiny-random", "--steps", "3"), dict)
    args_line = capsys.readouterr().err.splitlines()[-1]
    assert args_line == ("[mlx-stablefused] demo model: small defaults (--size 128, --frames 4); pass the flags to "
                         "change them")
    assert built["model_id"] == "demo:tiny-random"
    real = parse("--model", str(tmp_path))
    _common.setup(real, dict)
    assert (real.size, real.steps, real.frames) == (512, 30, 16)
    assert "demo" not in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse("--steps", "0")
    assert "--steps" in capsys.readouterr().err
