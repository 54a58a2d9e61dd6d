"""Resolving the paths and URLs users type, once and the same way for every reader and writer.

A store's zarr arrays and its fsspec-written shard records must land in one place. zarr keeps a
local path as typed, while fsspec expands ``~``; a shell leaves ``~`` unexpanded after ``=``
(``--out=~/cache.zarr``). So every store, run, image and output path goes through
``resolve_path`` where it enters the library.
"""

from __future__ import annotations

import os

LOCAL_PROTOCOLS = ("file://", "local://")


def is_url(path: str) -> bool:
    """True for an fsspec URL with a remote protocol (``s3://``, ``gs://``, ``memory://`` ...)."""
    return "://" in path and not path.startswith(LOCAL_PROTOCOLS)


def resolve_path(path: str | os.PathLike | None) -> str | None:
    """``~`` expanded and relative paths made absolute for local paths (``file://`` dropped);
    remote URLs are returned unchanged. None stays None. The result is idempotent."""
    if path is None:
        return None
    text = os.fspath(path)
    if is_url(text):
        return text
    for prefix in LOCAL_PROTOCOLS:
        if text.startswith(prefix):
            text = text[len(prefix) :]
    return os.path.abspath(os.path.expanduser(text))
