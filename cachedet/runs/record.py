"""The run contract: one record that config.json and every checkpoint share, and the run directory.

Run directory::

    config.json            RunRecord.to_dict() + "resumes" (the settings changed at each resume)
    metrics.jsonl          one JSON object per step (and per validation)
    checkpoints/last.pt    {"format", "epoch", "step", "run": RunRecord.to_dict(),
                            "state": {"detector", "backbone", "optimizer", "scheduler"},
                            "best": {"metric", "value", "step", "epoch"} or None (validated runs)}
    checkpoints/best.pt    the same, written when the validation metric ``best`` names improves
    tensorboard/           TensorBoard event files (when tensorboard is installed)
    curves.png             losses, lr and validation AP against steps
    .lock                  held (flock) while a train-heads writes the run

Checkpoints written before this layout (flat keys "config", "detector_config", "backbone_identity"
...) are read through ``load_run_checkpoint`` into the same shape.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass

from cachedet import __version__
from cachedet.cache.header import check_fingerprint, differences
from cachedet.core.atomic import remove_stale_temps, write_bytes_atomic, write_error
from cachedet.core.errors import CachedetError
from cachedet.core.paths import resolve_path
from cachedet.runs.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_atomic

RECORD_KEYS = (
    "train",
    "detector",
    "fingerprint",
    "backbone",
    "augment",
    "categories",
    "adapters",
    "data",
    "cachedet_version",
)


def _plain(value):
    return json.loads(
        json.dumps(value)
    )  # tuples as lists, as config.json and checkpoints keep them


@dataclass(frozen=True)
class RunRecord:
    """What a run is: its settings and what its heads depend on.

    train: the TrainConfig as a dict; detector: the DetectorConfig as a dict; fingerprint: the
    features and classes the heads fit (``cachedet.engine.sources.fingerprint``); backbone: the
    backbone's identity (timm name, out_indices, weights and their sha256, mean/std); augment: the
    views' augmentation settings; categories: [{id, name}] in label order; adapters: backbone
    stages with trained adapters (None: no adapters); data: the identity of the exact data it
    trained on (``StoreHeader.data_identity`` of a cache, the annotation file of an online run;
    None in runs recorded before it), compared on resume (``check_same_data``).
    """

    train: dict
    detector: dict
    fingerprint: dict
    backbone: dict | None
    augment: dict
    categories: list
    adapters: list | None = None
    data: dict | None = None
    cachedet_version: str = __version__

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in RECORD_KEYS}

    @classmethod
    def from_dict(cls, d: dict) -> "RunRecord":
        return cls(**{k: d[k] for k in RECORD_KEYS if k in d})

    def check_fits(self, found: dict, where: str, found_label: str) -> None:
        """Raise CachedetError naming each difference when features/classes ``found`` (a fingerprint
        of a store, an online backbone or another run) do not fit this run's heads."""
        check_fingerprint(
            found, self.fingerprint, f"{where} does not fit this run", found_label=found_label
        )

    def check_same_data(self, data: dict | None, where: str, run: str) -> None:
        """Raise CachedetError listing each difference (``checkpoint has OLD, asked for NEW``) when
        ``data`` (the identity of the data given now) is not what this run trained on. Runs recorded
        before data identities (``self.data`` None) are not checked."""
        if self.data is None or data is None:
            return
        diff = differences(_plain(self.data), _plain(data), found_label="checkpoint")
        if diff:
            raise CachedetError(
                f"TrainConfig.resume: {where} holds other data than run {run} was trained on "
                f"({'; '.join(diff)}); resume with the data it was trained on, or start another "
                "TrainConfig.out"
            )


def _upgrade(ckpt: dict) -> dict:
    """A checkpoint of the flat layout (cachedet 0.1 before the run record) in the current shape."""
    if "run" in ckpt:
        return ckpt
    record = RunRecord(
        train=ckpt["config"],
        detector=ckpt["detector_config"],
        fingerprint=ckpt["fingerprint"],
        backbone=ckpt.get("backbone_identity"),
        augment=ckpt.get("augment") or {},
        categories=ckpt["categories"],
        adapters=ckpt.get("adapters"),
        cachedet_version=ckpt.get("cachedet_version", "0.1.0"),
    )
    state = {k: ckpt.get(k) for k in ("detector", "backbone", "optimizer", "scheduler")}
    return {
        "format": ckpt["format"],
        "epoch": ckpt["epoch"],
        "step": ckpt["step"],
        "run": record.to_dict(),
        "state": state,
    }


EPOCH_NUMBERING = 1  # checkpoints' "epoch": the epoch finished, counted from 1 (as metrics.jsonl)


def load_run_checkpoint(path: str) -> dict:
    """A checkpoint in the current shape; raises CachedetError for a missing or foreign file.
    ``epoch`` is the epoch it was written after, counted from 1 (older checkpoints counted from 0
    and are read as such)."""
    ckpt = load_checkpoint(path)
    try:
        ckpt = _upgrade(ckpt)
        if ckpt.get("epoch_numbering") != EPOCH_NUMBERING:
            ckpt = {**ckpt, "epoch": ckpt["epoch"] + 1, "epoch_numbering": EPOCH_NUMBERING}
        return ckpt
    except KeyError as e:
        raise CachedetError(
            f"{path}: a cachedet checkpoint without its {e.args[0]!r} entry"
        ) from None


def save_run_checkpoint(
    path: str,
    record: RunRecord,
    epoch: int,
    step: int,
    state: dict,
    best: dict | None = None,
    epoch_step: int = 0,
    rng=None,
) -> None:
    """Atomically write a checkpoint (temp file + rename): a reader sees old or new, never half.
    ``epoch``: the epochs finished (counted from 1); ``epoch_step``: steps taken into the next
    one by a mid-epoch checkpoint (0 at an epoch's end), with torch's generator state ``rng``.
    ``best``: the best validation result so far ({metric, value, step, epoch}), kept for resuming."""
    save_atomic(
        {
            "format": CHECKPOINT_FORMAT,
            "epoch": epoch,
            "epoch_numbering": EPOCH_NUMBERING,
            "step": step,
            "run": record.to_dict(),
            "state": state,
            "best": best,
            "epoch_step": epoch_step,
            "rng": rng,
        },
        path,
    )


CHECKPOINTS = ("last", "best")
ORIGIN_KEYS = ("replayed_from", "overrides")


def checkpoint_path(run: str, checkpoint: str = "last") -> str:
    """The checkpoint file of ``run`` for ``checkpoint``: "last" (RUN/checkpoints/last.pt), "best"
    (RUN/checkpoints/best.pt, written by validation during training) or a path to a .pt file.

    Raises CachedetError naming the file when it does not exist (no fallback from best to last)."""
    run = resolve_path(run)
    if checkpoint in CHECKPOINTS:
        if os.path.isfile(run) and checkpoint == "last":  # a checkpoint file given as the run
            return run
        if not os.path.isdir(run):
            raise CachedetError(f"{run}: no such run directory")
        path = os.path.join(run, "checkpoints", f"{checkpoint}.pt")
        if checkpoint == "best" and not os.path.isfile(path):
            raise CachedetError(
                f"checkpoint best: no {path}: {run} has no checkpoints/best.pt (train-heads "
                "writes it when it validates: val.annotations with val.images or val.cache); "
                "use checkpoint last"
            )
        if not os.path.isfile(path):
            raise CachedetError(f"{path}: no such checkpoint")
        return path
    path = resolve_path(checkpoint)
    if not os.path.isfile(path):
        raise CachedetError(f"checkpoint {path}: expected 'best', 'last' or a checkpoint file")
    return path


class RunDir:
    """The files of one run directory (see the module docstring)."""

    def __init__(self, path: str):
        self.path = path
        self.checkpoints = os.path.join(path, "checkpoints")
        self.checkpoint = os.path.join(self.checkpoints, "last.pt")
        self.best = os.path.join(self.checkpoints, "best.pt")
        self.tensorboard = os.path.join(path, "tensorboard")
        self.curves = os.path.join(path, "curves.png")
        self.metrics = os.path.join(path, "metrics.jsonl")
        self.config = os.path.join(path, "config.json")
        self._lock = None

    def lock(self) -> None:
        """Hold an exclusive lock on the run (``.lock``, ``fcntl.flock``) until ``unlock`` or the process
        ends, so two train-heads with one --out never interleave. A crash releases it by itself.
        Once held, removes the temporary files of writes a killed run left (``.last.pt.<hex>.tmp``).
        Raises WriteError when the folder cannot be written."""
        import fcntl

        lock = os.path.join(self.path, ".lock")
        try:
            os.makedirs(self.path, exist_ok=True)
            f = open(lock, "a+")
        except OSError as e:
            raise write_error(e, lock) from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise CachedetError(
                f"TrainConfig.out {self.path}: another train-heads is writing this run; "
                "wait for it, or choose another TrainConfig.out"
            ) from None
        self._lock = f
        for folder in (self.path, self.checkpoints):  # what killed writes left (we hold the lock)
            remove_stale_temps(folder)

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def resume_history(
        self, step: int, epoch: int, changes: dict, resumed: bool, work_left: bool = True
    ) -> list[dict]:
        """config.json's list of resumptions so far, with this one (its step, epochs finished and
        changed settings) added when it has ``work_left`` (a resume with nothing to do adds none)."""
        history = list(self.saved().get("resumes", [])) if resumed else []
        if resumed and work_left:
            history.append({"step": step, "epoch": epoch, "changed": changes})
        return history

    def origin(self, origin: dict | None, resumed: bool) -> dict:
        """config.json's record of where the settings came from (``replayed_from``, ``overrides``): the
        given one, or on resume the one the run already has."""
        if origin is not None or not resumed:
            return dict(origin or {})
        saved = self.saved()
        return {k: saved[k] for k in ORIGIN_KEYS if k in saved}

    def saved(self) -> dict:
        """The run's config.json as written (empty when absent or unreadable: the settings
        themselves are read, with their errors, by ``TrainConfig.of_run``)."""
        try:
            with open(self.config) as f:
                saved = json.load(f)
        except (OSError, ValueError):
            return {}
        return saved if isinstance(saved, dict) else {}

    def truncate_metrics(self, last_step: int):
        """Drop metric lines written after the checkpoint we resume from (a killed run's tail; all
        of them when the run starts at step 0), so that no step is recorded twice. A line that is
        not a metrics object (half-written, edited) is dropped with a warning naming its line
        number; the lines after it are kept. Raises WriteError when the file cannot be rewritten."""
        if not os.path.exists(self.metrics):
            return
        with open(self.metrics, errors="replace") as f:
            lines = f.readlines()
        kept, bad = [], []
        for number, ln in enumerate(lines, 1):
            if not ln.strip():
                continue
            try:
                row = json.loads(ln)
                step = row["step"]
                if not isinstance(step, int):
                    raise TypeError(step)
            except (ValueError, KeyError, TypeError):
                bad.append(number)
                continue
            if step <= last_step:
                kept.append(ln if ln.endswith("\n") else ln + "\n")
        if bad:
            warnings.warn(
                f"{self.metrics}: skipped {len(bad)} malformed line(s) (line "
                f"{', '.join(map(str, bad[:5]))}{', …' if len(bad) > 5 else ''}); the others are kept",
                stacklevel=2,
            )
        if kept != lines:
            write_bytes_atomic(self.metrics, "".join(kept).encode())
