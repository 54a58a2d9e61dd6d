"""The codec pipeline a feed decodes its shard reads with (``loader.reader``): zarr-python's own,
or the Rust pipeline of zarrs-python, and the fork rule that keeps the latter from hanging."""

from __future__ import annotations

import importlib.util
import os
import warnings

from cachedet.core.errors import CachedetError

READERS = ("auto", "zarrs", "zarr")  # codec pipelines a feed may decode its shard reads with
ZARRS_PIPELINE = "zarrs.ZarrsCodecPipeline"


_ZARRS_STARTED_IN: list[int] = []  # the pid that opened arrays with zarrs (a fork inherits it)


def zarrs_opened(config: dict) -> None:
    """Note that this process opened an array under ``config`` (``reader_config``'s)."""
    if config.get("codec_pipeline.path") == ZARRS_PIPELINE and not _ZARRS_STARTED_IN:
        _ZARRS_STARTED_IN.append(os.getpid())


def forked_after_zarrs() -> bool:
    """Whether this process is a fork of one that had opened arrays with zarrs: zarrs' Rust
    thread pool does not survive a fork, and decoding with it in the child hangs."""
    return bool(_ZARRS_STARTED_IN) and _ZARRS_STARTED_IN[0] != os.getpid()


def reader_config(reader: str, one_thread: bool = False) -> dict:
    """The ``zarr.config`` under which a store's feature arrays are opened for reading.

    ``reader``: "zarrs" decodes with the Rust codec pipeline of zarrs-python (the package
    ``zarrs``; 1.06-1.25x the views per CPU second of zarr-python's own, by stored dtype, in
    ``benchmarks/results/feed_readers.md``); "zarr" with zarr-python's own pipeline; "auto"
    with zarrs when it is installed. Both read the same bytes into the same arrays; writes always
    use zarr-python's own. ``one_thread``: zarrs decodes on one thread (in DataLoader workers, which
    are the parallelism), else on zarr's ``threading.max_workers`` (default: every core). A process
    forked from one that had decoded with zarrs reads with zarr's own (``forked_after_zarrs``;
    with a warning when "zarrs" was asked for).
    Raises CachedetError naming ``loader.reader`` when "zarrs" is asked for but not installed, or
    the reader is unknown.
    """
    if reader not in READERS:
        raise CachedetError(f"loader.reader: expected one of {', '.join(READERS)}, got {reader!r}")
    if reader == "zarr":
        return {}
    if forked_after_zarrs():
        if reader == "zarrs":
            warnings.warn(
                "loader.reader zarrs: this process was forked from one whose zarrs threads had "
                "started, and they do not survive a fork; reading with zarr's own pipeline",
                stacklevel=2,
            )
        return {}
    if importlib.util.find_spec("zarrs") is None:
        if reader == "zarrs":
            raise CachedetError(
                "loader.reader zarrs: the zarrs package is not installed (pip install zarrs), "
                "or set loader.reader auto"
            )
        return {}
    config = {"codec_pipeline.path": ZARRS_PIPELINE}
    if one_thread:
        config["threading.max_workers"] = 1
    return config
