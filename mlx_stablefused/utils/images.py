"""Conversions between PIL images and numpy arrays, normalisation, grids, captions, gif and video files."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .array_types import is_mlx, is_torch


def numpy_to_pil(images: np.ndarray) -> list[Image.Image]:
    """(B, H, W, 3) or (H, W, 3) floats in [0, 1] (or uint8) -> list of RGB PIL images."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected images shaped (B, H, W, C) with C in 1/3/4, got {images.shape}")
    if images.dtype != np.uint8:
        images = (np.clip(images, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if images.shape[-1] == 1:
        return [Image.fromarray(im[..., 0], mode="L") for im in images]
    return [Image.fromarray(im) for im in images]


def pil_to_numpy(images: Image.Image | Sequence[Image.Image]) -> np.ndarray:
    """PIL image(s) -> (B, H, W, 3) float32 in [0, 1]."""
    if isinstance(images, Image.Image):
        images = [images]
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"images have different sizes: {sorted(shapes)}")
    return np.stack(arrays)


def normalize(images: Any) -> Any:
    """[0, 1] -> [-1, 1], the VAE's input range (numpy, mx.array or torch tensor in, the same out)."""
    return images * 2.0 - 1.0


def denormalize(images: Any) -> Any:
    """VAE output (about [-1, 1]) -> [0, 1], clipped (numpy, mx.array or torch tensor in, the same out)."""
    if is_torch(images):
        return (images / 2.0 + 0.5).clamp(0.0, 1.0)
    if is_mlx(images):
        import mlx.core as mx

        return mx.clip(images / 2.0 + 0.5, 0.0, 1.0)
    return np.clip(images / 2.0 + 0.5, 0.0, 1.0)


def numpy_to_pt(images: np.ndarray) -> Any:
    """(B, H, W, C) numpy -> (B, C, H, W) torch tensor, values and dtype kept (a 3-D array is taken as
    (B, H, W) and gets one channel), as stablefused's; needs torch."""
    import torch

    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def pt_to_numpy(images: Any) -> np.ndarray:
    """(B, C, H, W) torch tensor -> (B, H, W, C) float32 numpy, as stablefused's."""
    return images.detach().cpu().permute(0, 2, 3, 1).float().numpy()


def image_grid(images: Sequence[Image.Image], rows: int, cols: int) -> Image.Image:
    """Paste ``rows * cols`` images row-major into one image (cell size from the first image)."""
    if len(images) != rows * cols:
        raise ValueError(f"a {rows}x{cols} grid needs {rows * cols} images, got {len(images)}")
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def write_text_on_image(image: Image.Image, text: str, fontfile: str | None = None, fontsize: int = 30,
                        padding: int = 10, color: str = "white", stroke: str = "black") -> Image.Image:
    """Caption ``image`` (in place, and returned): word-wrapped, bottom-centred, outlined so it reads on
    any background. Works on current Pillow (stablefused used ``textsize``, removed in Pillow 10)."""
    draw = ImageDraw.Draw(image)
    font = _load_font(fontfile, fontsize)
    width, height = image.size
    avg = max(1.0, draw.textlength("abcdefghijklmnopqrstuvwxyz", font=font) / 26)
    lines = textwrap.wrap(text, width=max(1, int((width - 2 * padding) / avg))) or [""]
    line_height = draw.textbbox((0, 0), "Ay", font=font)[3] + padding // 2
    y = max(padding, height - padding - line_height * len(lines))
    for line in lines:
        w = draw.textlength(line, font=font)
        draw.text(((width - w) / 2, y), line, font=font, fill=color, stroke_width=max(1, fontsize // 15),
                  stroke_fill=stroke)
        y += line_height
    return image


def _load_font(fontfile: str | None, size: int) -> ImageFont.ImageFont:
    for candidate in ([fontfile] if fontfile else []) + ["DejaVuSans.ttf", "Arial.ttf", "arial.ttf"]:
        try:
            return ImageFont.truetype(candidate, size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)


def check_fps(fps: float) -> float:
    """A positive, finite frame rate: 0 would divide by zero (gif) or be silently replaced (ffmpeg)."""
    from ..validation import finite_float

    if finite_float(fps, "fps") <= 0:
        raise ValueError(f"fps must be positive, got {fps!r}")
    return fps


def pil_to_gif(images: Sequence[Image.Image], filename: str | Path, fps: int = 8, loop: int = 0) -> Path:
    """Write an animated GIF atomically; ``fps`` frames per second."""
    from ..checkpoint_io import atomic_path

    check_fps(fps)
    if not images:
        raise ValueError("no frames to write")
    path = Path(filename)
    with atomic_path(path, suffix=".gif") as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=list(images[1:]),
                       duration=max(1, round(1000 / fps)), loop=loop)
    return path


VIDEO_CODECS = {".webm": "libvpx-vp9", ".avi": "mpeg4", ".mp4": "libx264", ".mkv": "libx264", ".mov": "libx264"}


def pil_to_video(images: Sequence[Image.Image], filename: str | Path, fps: int = 8) -> Path:
    """Write a video (mp4, webm, mkv, mov, avi ... by extension; needs imageio-ffmpeg) atomically."""
    import imageio.v2 as imageio

    from ..checkpoint_io import atomic_path

    check_fps(fps)
    if not images:
        raise ValueError("no frames to write")
    path = Path(filename)
    size = images[0].size
    frames = [np.asarray(im.convert("RGB").resize(size) if im.size != size else im.convert("RGB")) for im in images]
    codec = VIDEO_CODECS.get(path.suffix.lower(), "libx264")
    try:
        with atomic_path(path, suffix=path.suffix) as tmp:
            # macro_block_size=2: yuv420p needs even sides; larger blocks would rescale every frame.
            writer = imageio.get_writer(str(tmp), fps=fps, format="FFMPEG", codec=codec, macro_block_size=2)
            try:
                for frame in frames:
                    writer.append_data(frame)
            finally:
                writer.close()
            if tmp.stat().st_size == 0:
                raise OSError(f"ffmpeg wrote nothing for {path} (codec {codec})")
    except ImportError as e:
        raise ImportError("writing video needs imageio-ffmpeg: pip install 'mlx-stablefused[video]'") from e
    return path
