"""The dataset scan before work: every image of an annotation file exists, has a readable header,
and is as large as the file says, found in one pass over the headers (no pixels decoded) before
any store is created or backbone built.

The upright size is compared (EXIF orientations 5-8 swap the stored sides), as ``read_image``
compares it when decoding.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field

from cachedet.core.errors import CachedetError
from cachedet.core.paths import is_url
from cachedet.data.coco import DetectionDataset, gc_paused
from cachedet.data.decode import check_image_size, image_header

PROGRESS_FROM = 2000  # images: a progress bar for scans at least this large


@dataclass
class ScanReport:
    """What the scan found: ``bad`` holds one {"image_id", "file", "problem", "error"} per bad image
    (problem: "missing", "unreadable" or "size"); ``scanned`` False when the images are remote."""

    num_images: int
    bad: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    scanned: bool = True

    @property
    def counts(self) -> dict[str, int]:
        """{problem: images}, in the order missing, unreadable, size."""
        found = Counter(b["problem"] for b in self.bad)
        return {k: found[k] for k in ("missing", "unreadable", "size") if found[k]}

    def summary(self) -> str:
        """One phrase: 'all 12 images found, sizes as annotated' or '2 of 12 images bad (1 missing, ...)'."""
        if not self.scanned:
            return f"{self.num_images} images on a remote store, not scanned"
        if not self.bad:
            return f"all {self.num_images} images found, headers readable, sizes as annotated"
        return f"{len(self.bad)} of {self.num_images} images bad ({self.kinds()})"

    def kinds(self) -> str:
        """'1 missing, 2 of another size'."""
        return ", ".join(f"{n} {_KIND[k]}" for k, n in self.counts.items())


_KIND = {"missing": "missing", "unreadable": "unreadable", "size": "of another size"}


def _problem(message: str) -> str:
    if "not found" in message:
        return "missing"
    return "size" if "but the annotation file" in message else "unreadable"


def scan_images(
    dataset: DetectionDataset,
    images_field: str,
    skip_field: str | None = None,
    skip_bad: bool = False,
    progress: bool = True,
) -> ScanReport:
    """Open each image's header once and compare its upright size with the annotated width/height.

    ``images_field`` names the images-folder setting in messages (``ExtractConfig.images``);
    ``skip_field`` the setting that leaves bad images out (None: there is none). Without
    ``skip_bad``, the first bad image stops the scan's caller in one line: the image, what is wrong
    (annotated and actual size for a mismatch) and how many of the images are bad. With it, the
    report lists them (``ScanReport.bad``). Remote (fsspec URL) image folders are not scanned.
    Raises CachedetError as above.
    """
    from cachedet.core.progress import ViewProgress

    report = ScanReport(num_images=len(dataset.images))
    if is_url(dataset.images_dir):
        report.scanned = False
        return report
    t0 = time.perf_counter()
    show = progress and len(dataset.images) >= PROGRESS_FROM
    with gc_paused(), ViewProgress("scan", len(dataset.images), unit="images", enabled=show) as bar:
        for rec in dataset.images:
            path = dataset.image_path(rec)
            try:
                width, height, orientation = image_header(path)
                check_image_size(path, (height, width), (rec.height, rec.width), orientation)
            except CachedetError as e:
                message = str(e)
                report.bad.append(
                    {
                        "image_id": rec.id,
                        "file": path,
                        "problem": _problem(message),
                        "error": message,
                    }
                )
            bar.advance()
    report.seconds = time.perf_counter() - t0
    if report.bad and not skip_bad:
        fix = f", or set {skip_field} to leave them out" if skip_field else ""
        raise CachedetError(
            f"{report.bad[0]['error']} ({len(report.bad)} of {report.num_images} images of "
            f"{dataset.annotation_path} under {images_field} {dataset.images_dir} bad: "
            f"{report.kinds()}); fix the images or the annotation file{fix}"
        )
    return report


def file_stamp(path: str) -> list | None:
    """[path, size in bytes, modification time in ns] of a local file; None when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [path, st.st_size, st.st_mtime_ns]


def image_stamps(image_ids, paths) -> dict[str, list | None]:
    """{image id: ``file_stamp``} of a shard's images (what its completion record keeps)."""
    return {str(int(i)): file_stamp(p) for i, p in zip(image_ids, paths)}
