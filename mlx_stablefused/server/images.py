"""Images over the wire: base64 in (A1111's optional ``data:`` prefix), PNG with A1111's ``parameters`` out."""

from __future__ import annotations

import base64
import binascii
import io

from PIL import Image, PngImagePlugin

from ..memory_estimate import check_pixel_cap


class FieldError(ValueError):
    """A request value refused: ``field`` names it (A1111's or OpenAI's field name), the message says why."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status = field, message, status


def decode_image(data: str | bytes, field: str) -> Image.Image:
    """A PNG/JPEG/WebP from base64 text (``data:image/png;base64,`` prefix allowed) or raw bytes."""
    if isinstance(data, str):
        text = data.split(",", 1)[1] if data.startswith("data:") and "," in data else data
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise FieldError(field, "not valid base64") from None
    try:
        image = Image.open(io.BytesIO(data))
        check_pixel_cap(image.height, image.width, (f"{field} height", f"{field} width"))
        image.load()
    except (OSError, Image.DecompressionBombError, SyntaxError) as e:
        raise FieldError(field, f"not a readable image ({e})") from None
    except ValueError as e:
        raise FieldError(field, str(e)) from None
    return image


def png_bytes(image: Image.Image, parameters: str) -> bytes:
    """PNG with A1111's ``parameters`` text chunk (what A1111's PNG Info and sd-parsers read)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=info)
    return out.getvalue()

