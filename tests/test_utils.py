"""Utilities: interpolation, grids, captions, gif and video files, conversions."""

import imageio.v2 as imageio
import numpy as np
import pytest
from PIL import Image

from mlx_stablefused import (image_grid, lerp, numpy_to_pil, pil_to_gif, pil_to_numpy, pil_to_video, slerp,
                             write_text_on_image)


@pytest.mark.parametrize("t,expected", [(0.0, [1, 0]), (0.25, [0.923880, 0.382683]), (0.5, [0.707107, 0.707107]),
                                        (1.0, [0, 1])])
def test_slerp_on_orthogonal_unit_vectors(t, expected):
    np.testing.assert_allclose(slerp(np.array([1.0, 0.0]), np.array([0.0, 1.0]), t), expected, atol=1e-6)


def test_slerp_array_weights_parallel_fallback_and_lerp():
    a, b = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    out = slerp(a, b, np.array([0.0, 0.5, 1.0]))
    assert out.shape == (3, 2)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(slerp(a, a * 2, 0.5), lerp(a, a * 2, 0.5))  # parallel: lerp
    np.testing.assert_allclose(lerp(a, b, 0.25), [0.75, 0.25])
    assert lerp(np.zeros((2, 3)), np.ones((2, 3)), np.array([0.1, 0.9])).shape == (2, 2, 3)


def frames(n=5, w=40, h=24):
    return [Image.fromarray(np.full((h, w, 3), 40 * i % 256, np.uint8)) for i in range(n)]


def test_image_grid():
    grid = image_grid(frames(6), rows=2, cols=3)
    assert grid.size == (120, 48)
    assert np.asarray(grid)[30, 90, 0] == np.asarray(frames(6)[5])[0, 0, 0]
    with pytest.raises(ValueError, match="needs 6 images"):
        image_grid(frames(5), 2, 3)


def test_gif_frame_count_and_atomic_write(tmp_path):
    path = pil_to_gif(frames(7), tmp_path / "a.gif", fps=10)
    with Image.open(path) as im:
        assert im.n_frames == 7 and im.info["duration"] == 100
    assert [p.name for p in tmp_path.iterdir()] == ["a.gif"]
    with pytest.raises(ValueError, match="no frames"):
        pil_to_gif([], tmp_path / "b.gif")


@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".mkv", ".mov", ".avi"])
def test_video_frame_count(tmp_path, suffix):
    path = pil_to_video(frames(9), tmp_path / f"v{suffix}", fps=8)
    reader = imageio.get_reader(str(path))
    assert reader.count_frames() == 9
    reader.close()


@pytest.mark.parametrize("fps", [0, -8, float("nan"), float("inf")])
@pytest.mark.parametrize("suffix", [".gif", ".mp4"])
def test_frame_rate_must_be_positive_and_finite(tmp_path, fps, suffix):
    writer = pil_to_gif if suffix == ".gif" else pil_to_video
    with pytest.raises(ValueError, match="fps must be"):
        writer(frames(3), tmp_path / f"v{suffix}", fps=fps)
    assert list(tmp_path.iterdir()) == []


def test_caption_draws_text_on_current_pillow():
    img = Image.new("RGB", (200, 120), "black")
    out = write_text_on_image(img, "a long caption that must wrap onto several lines at this width", fontsize=14)
    arr = np.asarray(out)
    assert arr[60:].max() > 200  # text appears in the lower part
    assert arr[:10].max() == 0


def test_numpy_pil_round_trip():
    x = np.random.default_rng(0).uniform(0, 1, (2, 8, 6, 3)).astype(np.float32)
    back = pil_to_numpy(numpy_to_pil(x))
    np.testing.assert_allclose(back, x, atol=1 / 255)
    assert numpy_to_pil(np.zeros((4, 4, 1)))[0].mode == "L"
    with pytest.raises(ValueError):
        numpy_to_pil(np.zeros((2, 4)))
