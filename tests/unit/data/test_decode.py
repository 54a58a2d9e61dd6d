"""The one image reader: EXIF orientation, every Pillow mode to RGB, large images, one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cachedet.core.errors import CachedetError
from cachedet.core.structures import ViewParams
from cachedet.data.decode import TRANSPARENT_FILL, bit_depth_scale, read_image
from cachedet.data.images import ViewDataset

H, W, BOX = 24, 32, (8, 6, 16, 12)  # x, y, w, h


def _canvas(bg, fg, dtype=np.uint8, ch=None):
    a = np.full((H, W) if ch is None else (H, W, ch), bg, dtype)
    x, y, w, h = BOX
    a[y : y + h, x : x + w] = fg
    return a


def _inside_outside(image: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    x, y, w, h = BOX
    a = image.permute(1, 2, 0).numpy().astype(float)
    return a[y : y + h, x : x + w].reshape(-1, 3).mean(0), a[:y].reshape(-1, 3).mean(0)


def _save(tmp_path, name, pil: Image.Image, **kw) -> str:
    path = str(tmp_path / name)
    pil.save(path, **kw)
    return path


@pytest.mark.parametrize(
    "values, mode, inside",
    [
        ((800, 3000), np.uint16, 3000 * 255 / 4095),  # 12-bit sensor in a 16-bit PNG: 12-bit scale
        ((100, 60000), np.uint16, 60000 * 255 / 65535),  # full 16-bit range
        ((10, 200), np.uint16, 200),  # 8-bit values in a 16-bit container stay as they are
    ],
)
def test_16bit_gray_scaled_by_bit_depth(tmp_path, values, mode, inside):
    path = _save(tmp_path, "g16.png", Image.fromarray(_canvas(*values, dtype=mode)))
    assert Image.open(path).mode.startswith("I")
    obj, bg = _inside_outside(read_image(path, (H, W)))
    assert obj == pytest.approx([inside] * 3, abs=0.6)
    assert bg[0] == pytest.approx(values[0] * inside / values[1], abs=0.6)


def test_32bit_int_and_float_modes(tmp_path):
    i32 = _save(tmp_path, "i32.tif", Image.fromarray(_canvas(1 << 20, 1 << 23, np.int32), mode="I"))
    obj, bg = _inside_outside(read_image(i32))
    assert obj[0] == pytest.approx((1 << 23) * 255 / (2**24 - 1), abs=0.6) and bg[
        0
    ] == pytest.approx(16, abs=0.6)
    unit = _save(tmp_path, "f.tif", Image.fromarray(_canvas(0.25, 1.0, np.float32), mode="F"))
    obj, bg = _inside_outside(read_image(unit))
    assert obj[0] == 255 and bg[0] == pytest.approx(64, abs=0.6)


def test_transparency_composited_over_the_mean_colour(tmp_path):
    rgba = _canvas((0, 0, 0, 0), (200, 40, 40, 255), ch=4)
    obj, bg = _inside_outside(
        read_image(_save(tmp_path, "a.png", Image.fromarray(rgba, mode="RGBA")))
    )
    assert tuple(obj) == (200, 40, 40) and tuple(bg) == TRANSPARENT_FILL
    la = Image.fromarray(_canvas((0, 0), (250, 255), ch=2), mode="LA")
    obj, bg = _inside_outside(read_image(_save(tmp_path, "la.png", la)))
    assert tuple(obj) == (250, 250, 250) and tuple(bg) == TRANSPARENT_FILL
    pal = Image.fromarray(_canvas(0, 1)).convert("P")
    pal.putpalette([255, 255, 255, 230, 40, 40] + [0] * 762)
    obj, bg = _inside_outside(read_image(_save(tmp_path, "p.png", pal, transparency=0)))
    assert tuple(obj) == (230, 40, 40) and tuple(bg) == TRANSPARENT_FILL  # not the palette's white


@pytest.mark.parametrize("mode", ["L", "1", "CMYK", "P", "RGB", "YCbCr"])
def test_other_modes_keep_the_object(tmp_path, mode):
    rgb = Image.fromarray(_canvas((20, 20, 20), (240, 240, 240), ch=3))
    pil = rgb.convert(mode)
    path = _save(
        tmp_path,
        f"m.{'jpg' if mode in ('CMYK', 'YCbCr') else 'png'}",
        pil,
        **({"quality": 95} if mode in ("CMYK", "YCbCr") else {}),
    )
    image = read_image(path, (H, W))
    assert image.dtype == torch.uint8 and image.shape == (3, H, W)
    obj, bg = _inside_outside(image)
    assert obj.min() > 200 and bg.max() < 60


def test_exif_orientation_applied_and_named_in_mismatches(tmp_path):
    upright = _canvas((40, 40, 40), (220, 30, 30), ch=3)  # the picture as displayed: W x H
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = _save(
        tmp_path,
        "e.jpg",
        Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90),
        exif=exif,
        quality=95,
    )
    image = read_image(path, (H, W))  # the upright size is what annotation files give
    obj, bg = _inside_outside(image)
    assert obj[0] > 180 and bg[0] < 80
    with pytest.raises(CachedetError, match="EXIF Orientation 6") as e:
        read_image(path, (W, H))  # a file made from the stored, sideways pixels
    assert "\n" not in str(e.value) and "e.jpg" in str(e.value)
    with pytest.raises(CachedetError) as e:  # no EXIF involved: the plain mismatch message
        read_image(_save(tmp_path, "n.png", Image.fromarray(upright)), (W, H))
    assert "EXIF" not in str(e.value)


def test_large_images_decode_and_the_own_limit_refuses(tmp_path, monkeypatch):
    path = _save(tmp_path, "big.png", Image.fromarray(_canvas(10, 250)))
    monkeypatch.setattr(
        Image, "MAX_IMAGE_PIXELS", 100
    )  # Pillow's bomb guard would refuse 768 pixels
    assert read_image(path).shape == (3, H, W)
    assert Image.MAX_IMAGE_PIXELS == 100  # the guard is restored for the rest of the process
    monkeypatch.setenv("CACHEDET_MAX_IMAGE_PIXELS", "500")
    with pytest.raises(CachedetError, match=r"big.png: image is 32x24 .*CACHEDET_MAX_IMAGE_PIXELS"):
        read_image(path)


def test_undecodable_files_give_one_line(tmp_path):
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    png = tmp_path / "cut.png"
    Image.fromarray(_canvas(10, 250)).save(png)
    png.write_bytes(png.read_bytes()[:60])  # truncated
    for name in ("junk.jpg", "cut.png", "missing.png"):
        with pytest.raises(CachedetError) as e:
            read_image(str(tmp_path / name))
        assert str(e.value).startswith(str(tmp_path / name)) and "\n" not in str(e.value)
        assert "0x" not in str(e.value)  # no Python object reprs
    with pytest.raises(CachedetError, match="is a folder"):
        read_image(str(tmp_path))


def test_bit_depth_rule():
    assert bit_depth_scale(np.array([0, 255])) == 1.0
    assert bit_depth_scale(np.array([1023])) == pytest.approx(255 / 1023)
    assert bit_depth_scale(np.array([1024])) == pytest.approx(255 / 4095)
    assert bit_depth_scale(np.array([2.0**40])) == pytest.approx(255 / 2.0**40)


def test_skip_bad_records_any_failure(tmp_path, monkeypatch):
    """--skip-bad records an image whatever went wrong turning it into a view, not only reader errors."""
    path = _save(tmp_path, "ok.png", Image.fromarray(_canvas(10, 250)))
    view = ViewParams(
        image_id=1,
        view_index=0,
        orig_size=(H, W),
        resized_size=(H, W),
        crop_offset=(0, 0),
        flip=False,
        canvas=32,
    )
    import cachedet.data.images as images

    def broken(*a, **k):
        raise MemoryError("cannot allocate")

    monkeypatch.setattr(images, "transform_image", broken)
    ds = ViewDataset([view], [path], (0.5,) * 3, (0.5,) * 3, skip_bad=True)
    pixels, error, _ = ds[0]
    assert "ok.png" in error and "MemoryError" in error and float(pixels.abs().sum()) == 0
    with pytest.raises(MemoryError):
        ViewDataset([view], [path], (0.5,) * 3, (0.5,) * 3)[0]
