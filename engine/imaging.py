"""Image decoding and preprocessing, defined once and shared by the pipeline and the service.

The pipeline and the service must turn the same bytes into the same model input, or
"similar to this photo" would search a different space than the one the index was built in.
Whatever arrives from the internet is hostile until proven otherwise: only common web formats
are opened (never EPS, which runs Ghostscript), the pixel count is checked from the header
before any pixel is decoded, and every failure is an ``ImageRejected`` with a stable reason.
"""
from __future__ import annotations

import hashlib
import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

Image.init()
# What product photos come as. Anything else (EPS, PSD, FITS, ...) is "not_an_image".
FORMATS = tuple(f for f in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO", "AVIF") if f in Image.OPEN)
ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
WIDE_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}
STRIP_PIXELS = 1 << 20


class ImageRejected(ValueError):
    """Bytes that are not a usable image; ``reason`` is a stable code for reports."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Open (header only) and refuse bombs before a single pixel is decompressed."""
    with warnings.catch_warnings():
        # Our own max_pixels is the limit; Pillow's warning threshold would only duplicate it.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    depth = bit_depth(img)
    weight = max(1, depth // 8)  # a 16-bit image costs twice the memory of an 8-bit one while it decodes
    if img.width * img.height * weight > max_pixels:
        deep = f" at {depth} bits per sample (counted {weight}x)" if weight > 1 else ""
        raise ImageRejected("too_many_pixels", f"{img.width}x{img.height}{deep} > {max_pixels} pixels")
    return img


def bit_depth(img: Image.Image) -> int:
    """Bits per sample as stored, read from the header: Pillow opens 16-bit RGB PNGs as 'RGB'
    and narrows them while decoding, so the raw mode of the first tile tells."""
    if img.mode in ("I", "F"):
        return 32
    if img.mode in WIDE_MODES:
        return 16
    raw = img.tile[0][3] if img.tile and len(img.tile[0]) > 3 else None
    raw = raw[0] if isinstance(raw, tuple) else raw
    return 16 if isinstance(raw, str) and ";16" in raw else 8


def decode(data: bytes, max_pixels: int = 40_000_000) -> Image.Image:
    """Decode bytes to an upright 8-bit RGB image, refusing empty, broken or bomb-sized input."""
    if not data:
        raise ImageRejected("empty_body", "0 bytes")
    try:
        img = _open(data, max_pixels)
        img.load()
    except ImageRejected:
        raise
    except UnidentifiedImageError:
        raise ImageRejected("not_an_image", f"not a {'/'.join(FORMATS)} image; {describe(data)}") from None
    except Image.DecompressionBombError as exc:
        raise ImageRejected("too_many_pixels", str(exc)[:200]) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageRejected("decode_error", str(exc)[:200] or type(exc).__name__) from None
    return to_rgb(upright(img))


def describe(data: bytes) -> str:
    """What a body was, without quoting it: a catalog URL may point at a secret (/proc/self/environ)."""
    return f"{len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()[:16]}"


def upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a broken EXIF block leaves the image as stored, not rejected."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 -- malformed EXIF comes in many exception types
        return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode (palette, alpha, CMYK, 16-bit, float, 1-bit, grayscale) to 8-bit RGB; transparency on white."""
    if img.mode == "RGB":
        return img
    if img.mode in WIDE_MODES:
        img = _to_8bit(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ALPHA_MODES:
        img = img.convert("RGBA")
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img.convert("RGB")


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit grayscale to 8-bit 'L'. 16-bit data keeps its tones (value / 257);
    float or 32-bit data outside 0..65535 has no fixed range and is stretched min..max.
    Done in strips of rows, so the float copy never holds more than ``STRIP_PIXELS``."""
    lo, hi = img.getextrema() if img.width and img.height else (0.0, 0.0)
    lo, hi = float(lo), float(hi)
    fixed = img.mode != "F" and 0 <= lo and hi <= 65535
    out = Image.new("L", img.size)
    rows = max(1, STRIP_PIXELS // max(1, img.width))
    for y in range(0, img.height, rows):
        box = (0, y, img.width, min(img.height, y + rows))
        arr = np.asarray(img.crop(box), dtype=np.float64)
        if fixed:
            arr = arr / 257.0
        else:
            arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        out.paste(Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L"), box[:2])
    return out


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


def fit(img: Image.Image, size: int) -> np.ndarray:
    """The whole image, enlarged or shrunk so its longest side is ``size`` (aspect kept), as uint8 HWC:
    what the detect stage looks at and cuts crops from."""
    img = upscale_small(img, size)
    if max(img.size) > size:
        img = img.copy()
        img.thumbnail((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)
    return np.asarray(img, dtype=np.uint8)


def prepare(data: bytes, size: int, max_pixels: int = 40_000_000) -> np.ndarray:
    """Bytes -> uint8 ``size`` x ``size`` x 3 array ready for the embedder."""
    return preprocess(decode(data, max_pixels), size)


THUMB_QUALITY = 80


def thumbnail(img: Image.Image, size: int = 160, quality: int = THUMB_QUALITY) -> bytes:
    """A small JPEG of a decoded image (longest side ``size``, never enlarged) for result pages:
    a few KB, made where the image is already decoded, so pages never fetch catalog images."""
    small = img.copy()
    small.thumbnail((size, size), Image.Resampling.BICUBIC, reducing_gap=2.0)
    out = io.BytesIO()
    small.convert("RGB").save(out, "JPEG", quality=quality, optimize=True, progressive=False)
    return out.getvalue()
