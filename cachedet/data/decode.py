"""The one image reader of every stage: file bytes -> upright uint8 RGB pixels.

``read_image`` serves extract, ``--online`` training, eval, predict and drawing alike, so a pixel
means the same thing everywhere. It follows what viewers and labelling tools show:

- EXIF orientation is applied first (``PIL.ImageOps.exif_transpose``), before any size or box is
  compared: annotation files give the upright (displayed) size.
- Every Pillow mode maps to RGB without losing the picture (``to_rgb``, kept in the torch-free
  ``cachedet.data.preprocess`` that ``cachedet export`` ships beside a model):
  high-bit-depth integers (``I;16*``, ``I``) are scaled by their bit depth, taken as the smallest
  of 8, 10, 12, 14, 16, 24 or 32 bits that holds the image's largest value (so a 12-bit sensor
  stored in a 16-bit PNG is not 16× too dark); floats (``F``) in [0, 1] are scaled by 255, others by
  the same bit-depth rule; transparency (``RGBA``, ``LA``, ``PA``, palettes with a transparent
  index) is composited over ``TRANSPARENT_FILL``, the ImageNet mean colour, which normalises to about
  0 like the canvas padding; ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``1``, ``L`` and ``P`` go through
  Pillow's own conversion.
- Large images decode: Pillow's decompression-bomb guard (about 179 megapixels) protects servers
  from strangers' uploads, not a user from their own training data. The reader allows up to
  ``max_image_pixels()`` (default 2**30, about 1.07 gigapixels, 3.2 GB as RGB; environment variable
  ``CACHEDET_MAX_IMAGE_PIXELS``) and refuses larger ones in one line.
"""

from __future__ import annotations

import io
import os
import re
import threading

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from cachedet.core.errors import CachedetError
from cachedet.data.preprocess import (  # the RGB rules, shared with the export's numpy reference
    EXIF_ORIENTATION,
    TRANSPARENT_FILL,
    bit_depth_scale,
    to_rgb,
    upright_rgb,
)

__all__ = ["TRANSPARENT_FILL", "bit_depth_scale", "max_image_pixels", "read_image", "to_rgb"]

DEFAULT_MAX_IMAGE_PIXELS = 1 << 30
_SWAPS_SIDES = (5, 6, 7, 8)  # EXIF orientations that rotate by 90 degrees
_OPEN_LOCK = threading.Lock()
_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


def max_image_pixels() -> int:
    """The largest image (width x height) the reader decodes: ``CACHEDET_MAX_IMAGE_PIXELS`` or 2**30."""
    text = os.environ.get("CACHEDET_MAX_IMAGE_PIXELS", "")
    try:
        return int(text) if text else DEFAULT_MAX_IMAGE_PIXELS
    except ValueError:
        raise CachedetError(
            f"CACHEDET_MAX_IMAGE_PIXELS={text}: expected an integer number of pixels"
        ) from None


def _open(source) -> Image.Image:
    """``Image.open`` (header only) without Pillow's decompression-bomb guard (``max_image_pixels``
    applies instead, when decoding)."""
    with _OPEN_LOCK:  # Pillow's guard is a module global: lift it only while this header is parsed
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # our own limit applies below
        try:
            return Image.open(source)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _orientation(pil: Image.Image, header_only: bool = False) -> int:
    """The EXIF orientation (1 when absent). ``header_only``: a PNG whose eXIf chunk is not in the
    part already parsed counts as 1 (Pillow would decode the pixels to look further)."""
    if header_only and pil.format == "PNG" and "exif" not in pil.info:
        return 1
    return int(pil.getexif().get(EXIF_ORIENTATION, 1) or 1)


def image_header(path: str) -> tuple[int, int, int]:
    """(width, height, EXIF orientation) of an image file from its header, without decoding the
    pixels; width and height are upright (EXIF orientations 5-8 swap the stored sides), as
    ``read_image`` returns them. Raises CachedetError naming the file when it is missing, a folder,
    unreadable or not an image format Pillow can read."""
    try:
        with _open(path) as pil:
            w, h = pil.size
            orientation = _orientation(pil, header_only=True)
    except FileNotFoundError:
        raise CachedetError(f"{path}: image file not found") from None
    except IsADirectoryError:
        raise CachedetError(f"{path}: is a folder, not an image file") from None
    except Exception as e:  # Pillow raises many types for truncated, exotic or hostile files
        raise CachedetError(f"{path}: cannot read image header ({_first_line(e)})") from None
    return (h, w, orientation) if orientation in _SWAPS_SIDES else (w, h, orientation)


def check_image_size(
    path: str, found: tuple[int, int], expected: tuple[int, int], orientation: int
) -> None:
    """Raise CachedetError when the upright (height, width) ``found`` is not the annotated
    (height, width) ``expected``, naming the file and both sizes (and the EXIF cause, when it is one)."""
    if tuple(found) != tuple(expected):
        raise CachedetError(_size_mismatch(path, tuple(found), tuple(expected), orientation))


def _decode(path: str, data: bytes) -> tuple[np.ndarray, int]:
    """(H, W, 3) uint8 upright pixels and the file's EXIF orientation (1 when absent)."""
    limit = max_image_pixels()
    with _open(io.BytesIO(data)) as pil:
        w, h = pil.size
        if w * h > limit:
            raise CachedetError(
                f"{path}: image is {w}x{h} ({w * h / 1e6:.0f} megapixels), over the reader's "
                f"limit of {limit / 1e6:.0f}; raise CACHEDET_MAX_IMAGE_PIXELS to decode it"
            )
        orientation = _orientation(pil)
        return upright_rgb(pil), orientation


def _first_line(e: Exception) -> str:
    """The exception's first line, without Python object reprs (Pillow names its BytesIO)."""
    if isinstance(e, UnidentifiedImageError):
        return "not an image format Pillow can read"
    text = _OBJECT_REPR.sub("the file", str(e)).strip()
    return text.splitlines()[0] if text else type(e).__name__


def read_image(path: str, expected_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Decode an image file to upright uint8 (3, H, W) RGB.

    Raises CachedetError naming the file when it is missing, unreadable, not a decodable image
    (whatever Pillow raises), over the pixel limit, or of another size than the annotation file
    says (``expected_size`` = (height, width), in the upright frame); when the EXIF orientation
    explains a mismatch, the message says so.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CachedetError(f"{path}: image file not found") from None
    except IsADirectoryError:
        raise CachedetError(f"{path}: is a folder, not an image file") from None
    except OSError as e:
        raise CachedetError(f"{path}: cannot read image file ({e.strerror})") from None
    try:
        array, orientation = _decode(path, data)
    except CachedetError:
        raise
    except Exception as e:  # Pillow raises many types for truncated, exotic or hostile files
        raise CachedetError(f"{path}: cannot decode image ({_first_line(e)})") from None
    image = torch.from_numpy(array.copy()).permute(2, 0, 1)
    if expected_size is not None:
        check_image_size(path, tuple(image.shape[-2:]), expected_size, orientation)
    return image


def _size_mismatch(
    path: str, found: tuple[int, int], expected: tuple[int, int], orientation: int
) -> str:
    (fh, fw), (eh, ew) = found, expected
    text = (
        f"{path}: image is {fw}x{fh} (width x height) but the annotation file's images[].width/height "
        f"say {ew}x{eh}"
    )
    if orientation in _SWAPS_SIDES and (fw, fh) == (eh, ew):
        text += (
            f"; the file's EXIF Orientation {orientation} turns its stored {fh}x{fw} pixels upright to "
            f"{fw}x{fh}, so the annotation file was likely made from the stored, unrotated pixels: "
            "re-export it from a tool that applies EXIF, or strip the EXIF orientation from the images"
        )
    return text
