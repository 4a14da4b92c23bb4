"""Image decoding and preprocessing, defined once and shared by the pipeline and the service.

The pipeline and the service must turn the same bytes into the same model input, or
"similar to this photo" would search a different space than the one the index was built in.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageRejected(ValueError):
    """Bytes that are not a usable image; ``reason`` is a stable code for reports."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def decode(data: bytes, max_pixels: int = 40_000_000) -> Image.Image:
    """Decode bytes to an upright RGB image, refusing empty, broken or bomb-sized input."""
    if not data:
        raise ImageRejected("empty_body", "0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > max_pixels:
                raise ImageRejected("too_many_pixels", f"{img.width}x{img.height} > {max_pixels} pixels")
            img.load()
    except ImageRejected:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected("not_an_image" if isinstance(exc, UnidentifiedImageError) else "too_many_pixels",
                            str(exc)[:200]) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageRejected("decode_error", str(exc)[:200]) from None
    img = ImageOps.exif_transpose(img)
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode (palette, RGBA, CMYK, 16-bit, grayscale) to 8-bit RGB; transparency on white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float32)
        hi = float(arr.max()) or 1.0
        img = Image.fromarray((arr / hi * 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img.convert("RGB")


def model_input(img: Image.Image, size: int) -> np.ndarray:
    """Letterbox to a white ``size`` x ``size`` square (aspect kept), as uint8 HWC."""
    img = img.copy()
    img.thumbnail((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)
    if img.size != (size, size):
        canvas = Image.new("RGB", (size, size), (255, 255, 255))
        canvas.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
        img = canvas
    return np.asarray(img, dtype=np.uint8)


def upscale_small(img: Image.Image, size: int) -> Image.Image:
    """Small images are enlarged to fill the model input (``thumbnail`` only shrinks)."""
    if max(img.size) >= size:
        return img
    scale = size / max(img.size)
    return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                      Image.Resampling.BICUBIC)


def preprocess(img: Image.Image, size: int) -> np.ndarray:
    """A decoded RGB image -> the embedder's input; the one definition pipeline and service share."""
    return model_input(upscale_small(img, size), size)


def prepare(data: bytes, size: int, max_pixels: int = 40_000_000) -> np.ndarray:
    """Bytes -> uint8 ``size`` x ``size`` x 3 array ready for the embedder."""
    return preprocess(decode(data, max_pixels), size)
