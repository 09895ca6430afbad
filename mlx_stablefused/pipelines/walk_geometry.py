"""Geometry of inpainting walks: shifting or shrinking an image to expose a region to paint, and the
in-between frames that slide or zoom from one painted image to the next. Pure numpy/PIL."""

from __future__ import annotations

from enum import Enum

import numpy as np
from PIL import Image


class WalkType(str, Enum):
    """Camera motion of one walk step (stablefused's InpaintWalkType)."""

    UP = "up"
    DOWN = "down"
    LEFT = "left"
    RIGHT = "right"
    BACKWARD = "backward"  # zoom out: the image shrinks, a border is painted around it
    FORWARD = "forward"  # zoom in: a backward walk played in reverse


PANS = (WalkType.UP, WalkType.DOWN, WalkType.LEFT, WalkType.RIGHT)


def parse_walk_type(value: str | WalkType) -> WalkType:
    try:
        return WalkType(str(getattr(value, "value", value)).lower())
    except ValueError:
        raise ValueError(f"unknown walk type {value!r}; expected one of {[w.value for w in WalkType]}") from None


def shift_and_mask(image: Image.Image, walk: WalkType, shift: int) -> tuple[Image.Image, Image.Image]:
    """Move the camera ``shift`` pixels: the content slides the other way, the exposed strip is black in the
    image and white (to paint) in the mask."""
    pixels = np.asarray(image.convert("RGB"))
    h, w = pixels.shape[:2]
    out = np.zeros_like(pixels)
    mask = np.zeros((h, w), np.uint8)
    if walk == WalkType.RIGHT:
        out[:, : w - shift], mask[:, w - shift:] = pixels[:, shift:], 255
    elif walk == WalkType.LEFT:
        out[:, shift:], mask[:, :shift] = pixels[:, : w - shift], 255
    elif walk == WalkType.DOWN:
        out[: h - shift], mask[h - shift:] = pixels[shift:], 255
    elif walk == WalkType.UP:
        out[shift:], mask[:shift] = pixels[: h - shift], 255
    else:
        raise ValueError(f"{walk} is not a pan")
    return Image.fromarray(out), Image.fromarray(mask)


def shrink_and_mask(image: Image.Image, border: tuple[int, int]) -> tuple[Image.Image, Image.Image]:
    """Zoom out: the image shrunk by ``border`` = (x, y) pixels on each side, centred on black; the border
    is white in the mask."""
    bx, by = border
    w, h = image.size
    inner = image.convert("RGB").resize((w - 2 * bx, h - 2 * by), Image.LANCZOS)
    out = Image.new("RGB", (w, h))
    out.paste(inner, (bx, by))
    mask = np.full((h, w), 255, np.uint8)
    mask[by: h - by, bx: w - bx] = 0
    return out, Image.fromarray(mask)


def pan_frames(start: Image.Image, end: Image.Image, walk: WalkType, shift: int, count: int) -> list[Image.Image]:
    """``count`` frames sliding from ``start`` to ``end`` (which is ``start`` moved by ``shift``); the last
    frame is ``end``."""
    a, b = np.asarray(start.convert("RGB")), np.asarray(end.convert("RGB"))
    h, w = a.shape[:2]
    # A canvas holding both views: the part of start that leaves the frame, then end.
    if walk == WalkType.RIGHT:
        canvas = np.concatenate([a[:, :shift], b], axis=1)
    elif walk == WalkType.LEFT:
        canvas = np.concatenate([b, a[:, w - shift:]], axis=1)
    elif walk == WalkType.DOWN:
        canvas = np.concatenate([a[:shift], b], axis=0)
    else:
        canvas = np.concatenate([b, a[h - shift:]], axis=0)
    frames = []
    for j in range(1, count + 1):
        c = round(shift * j / count)
        if walk == WalkType.RIGHT:
            view = canvas[:, c: c + w]
        elif walk == WalkType.LEFT:
            view = canvas[:, shift - c: shift - c + w]
        elif walk == WalkType.DOWN:
            view = canvas[c: c + h]
        else:
            view = canvas[shift - c: shift - c + h]
        frames.append(Image.fromarray(np.ascontiguousarray(view)))
    return frames


def zoom_out_frames(start: Image.Image, end: Image.Image, border: tuple[int, int], count: int) -> list[Image.Image]:
    """``count`` frames zooming out geometrically from ``start`` to ``end`` (``start`` shrunk inside a painted
    border). The centre is drawn from the sharp ``start`` at every frame; the last frame is ``end``."""
    w, h = end.size
    bx, by = border
    frames = []
    for j in range(1, count + 1):
        p = j / count
        if j == count:
            frames.append(end.copy())
            continue
        # Visible window of ``end``: from its inner box (p=0) to all of it (p=1), geometric in scale.
        scale = (w / (w - 2 * bx)) ** p
        vw, vh = (w - 2 * bx) * scale, (h - 2 * by) * (h / (h - 2 * by)) ** p
        left, top = (w - vw) / 2, (h - vh) / 2
        frame = end.resize((w, h), Image.LANCZOS, box=(left, top, left + vw, top + vh))
        # Where start lies in this frame, paste it sharp (it is the unresampled source of the centre).
        iw, ih = round(w * (w - 2 * bx) / vw), round(h * (h - 2 * by) / vh)
        frame.paste(start.convert("RGB").resize((iw, ih), Image.LANCZOS), ((w - iw) // 2, (h - ih) // 2))
        frames.append(frame)
    return frames
