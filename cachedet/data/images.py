"""Decoding images from disk into views, as a map-style Dataset for a DataLoader."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from cachedet.data.copy_paste import composite
from cachedet.data.masks import encode_rle, view_masks
from cachedet.data.views import normalize, transform_image
from cachedet.errors import CachedetError
from cachedet.structures import ViewParams


def read_image(path: str, expected_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Decode an image file to uint8 (3, H, W) RGB.

    Raises CachedetError naming the file when it is missing, unreadable, not an image, or of
    another size than the annotation file says (``expected_size`` = (height, width)).
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CachedetError(f"{path}: image file not found") from None
    except OSError as e:
        raise CachedetError(f"{path}: cannot read image file ({e.strerror})") from None
    try:
        with Image.open(io.BytesIO(data)) as pil:
            array = np.asarray(pil.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CachedetError(f"{path}: cannot decode image ({first})") from None
    image = torch.from_numpy(array.copy()).permute(2, 0, 1)
    if expected_size is not None and tuple(image.shape[-2:]) != tuple(expected_size):
        h, w = expected_size
        raise CachedetError(
            f"{path}: image is {image.shape[-1]}x{image.shape[-2]} (width x height) but the annotation "
            f"file's images[].width/height say {w}x{h}"
        )
    return image


class ViewDataset(Dataset):
    """Items are views: (normalised view float32 (3, S, S), error message or '', masks).

    With ``skip_bad`` an unreadable image gives an all-zero view and its error message instead of
    raising, so the caller can record it. ``masks`` (per view, a tuple of ``MaskSource``) makes the
    item's third part the view's instance masks as compressed RLE bytes, one per object (else None);
    masks need no pixels, so a bad image still gets them.
    """

    def __init__(self, views: list[ViewParams], paths: list[str], mean, std, skip_bad: bool = False,
                 pastes: list | None = None, masks: list | None = None):
        assert len(views) == len(paths)
        self.views, self.paths = views, paths
        self.pastes = pastes or [None] * len(views)  # Copy-Paste plans (cachedet.data.copy_paste)
        self.masks = masks
        self.mean, self.std, self.skip_bad = tuple(mean), tuple(std), skip_bad

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, list[bytes] | None]:
        masks = None
        if self.masks is not None:
            masks = [encode_rle(m) for m in view_masks(self.views[i], self.masks[i], self.pastes[i])]
        view, error = self._view(i)
        return view, error, masks

    def _view(self, i: int) -> tuple[torch.Tensor, str]:
        params, paste = self.views[i], self.pastes[i]
        try:
            view = transform_image(params, normalize(read_image(self.paths[i], params.orig_size), self.mean, self.std))
            if paste is not None:
                source = read_image(paste.source_path, paste.source_view.orig_size)
                view = composite(view, transform_image(paste.source_view, normalize(source, self.mean, self.std)), paste.mask())
        except CachedetError as e:
            if not self.skip_bad:
                raise
            return torch.zeros(3, params.canvas, params.canvas), str(e)
        return view, ""
