import io

import numpy as np
import pytest
from PIL import Image

from engine import imaging
from engine.imaging import ImageRejected


def png(img: Image.Image, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("data,reason", [
    (b"", "empty_body"),
    (b"<html>not found</html>", "not_an_image"),
])
def test_rejects_non_images(data, reason):
    with pytest.raises(ImageRejected) as err:
        imaging.decode(data)
    assert err.value.reason == reason


def test_truncated_image_is_a_decode_error():
    data = png(Image.new("RGB", (300, 300), (10, 200, 30)).effect_spread(5))
    with pytest.raises(ImageRejected) as err:
        imaging.decode(data[: len(data) // 2])
    assert err.value.reason == "decode_error"


def test_pixel_bomb_is_refused_before_decoding():
    data = png(Image.new("L", (4000, 4000)))
    with pytest.raises(ImageRejected) as err:
        imaging.decode(data, max_pixels=1_000_000)
    assert err.value.reason == "too_many_pixels"


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "CMYK", "I;16", "LA"])
def test_any_mode_becomes_rgb_model_input(mode):
    img = Image.new("RGB", (50, 80), (200, 20, 20)).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    out = imaging.prepare(png(img, fmt), 224)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8


def test_letterbox_keeps_aspect_on_white():
    out = imaging.prepare(png(Image.new("RGB", (100, 50), (0, 0, 0))), 64)
    assert (out[0, 0] == 255).all() and (out[32, 32] == 0).all()
    assert (out[:15] == 255).all() and (out[-15:] == 255).all()


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (60, 30), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    assert imaging.decode(buf.getvalue()).size == (30, 60)


def test_16_bit_grayscale_keeps_its_tones():
    img = Image.fromarray(np.full((10, 10), 257 * 40, dtype=np.uint16))
    assert imaging.decode(png(img)).getpixel((5, 5)) == (40, 40, 40)


def test_float_image_is_stretched_to_8_bit():
    arr = np.linspace(-1.0, 3.0, 100, dtype=np.float32).reshape(10, 10)
    out = np.asarray(imaging.to_rgb(Image.fromarray(arr, "F")))
    assert out.shape == (10, 10, 3) and out.min() == 0 and out.max() == 255


def test_broken_exif_leaves_the_image_as_stored():
    img = Image.new("RGB", (60, 30), "red")
    exif = Image.Exif()
    exif[0x0112] = 99  # not an orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    assert imaging.decode(buf.getvalue()).size == (60, 30)
