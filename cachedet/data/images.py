"""Decoding images from disk into views, as a map-style Dataset for a DataLoader.

``read_image`` (``cachedet.data.decode``) is the one image reader of every stage; it is re-exported here.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from cachedet.core.errors import CachedetError
from cachedet.core.structures import ViewParams
from cachedet.data.copy_paste import composite
from cachedet.data.decode import read_image
from cachedet.data.masks import encode_rle, view_masks
from cachedet.data.views import normalize, transform_image

__all__ = ["ViewDataset", "read_image"]


class ViewDataset(Dataset):
    """Items are views: (normalised view float32 (3, S, S), error message or '', masks).

    With ``skip_bad`` an unreadable image gives an all-zero view and its error message instead of
    raising, so the caller can record it. ``masks`` (per view, a tuple of ``MaskSource``) makes the
    item's third part the view's instance masks as compressed RLE bytes, one per object (else None);
    masks need no pixels, so a bad image still gets them.
    """

    def __init__(
        self,
        views: list[ViewParams],
        paths: list[str],
        mean,
        std,
        skip_bad: bool = False,
        pastes: list | None = None,
        masks: list | None = None,
    ):
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
            masks = [
                encode_rle(m) for m in view_masks(self.views[i], self.masks[i], self.pastes[i])
            ]
        view, error = self._view(i)
        return view, error, masks

    def _view(self, i: int) -> tuple[torch.Tensor, str]:
        params, paste = self.views[i], self.pastes[i]
        try:
            view = transform_image(
                params, normalize(read_image(self.paths[i], params.orig_size), self.mean, self.std)
            )
            if paste is not None:
                source = read_image(paste.source_path, paste.source_view.orig_size)
                view = composite(
                    view,
                    transform_image(paste.source_view, normalize(source, self.mean, self.std)),
                    paste.mask(),
                )
        except (
            Exception
        ) as e:  # --skip-bad records every image that cannot become a view, whatever failed
            if not self.skip_bad:
                raise
            message = (
                str(e)
                if isinstance(e, CachedetError)
                else f"{self.paths[i]}: {type(e).__name__}: {e}"
            )
            return torch.zeros(3, params.canvas, params.canvas), message
        return view, ""
