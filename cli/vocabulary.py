"""One vocabulary for every command: option names, the config fields they set, old spellings, choices.

This module imports neither torch nor timm (``cachedet --help`` must answer at once), so the
choices below copy the library's tuples; ``tests/test_cli.py`` checks that they stay equal.

Names used in every command:
  --batch-size     images (views) per step or per forward pass
  --loader-workers DataLoader worker processes (image decoding, cache reading)
  --dask-workers   dask worker processes (extract only)
  --device         auto (CUDA when available, else CPU), cpu, cuda or cuda:N; default auto everywhere
  --size           side of the square canvas in pixels: 640 wherever a canvas is made (extract,
                   train-heads --online, model-info, bench); a cache run uses the store's canvas
"""

from __future__ import annotations

import sys
from typing import Literal

from typer.core import TyperCommand

from cachedet.core.recipes import DEFAULT_CANVAS  # imports no torch

DEFAULT_BACKBONE = "efficientnet_lite0"  # = cachedet.backbones.DEFAULT_BACKBONE
Neck = Literal["auto", "fpn", "nasfpn", "simple"]  # = auto + cachedet.models.build.NECKS
Head = Literal["faster-rcnn", "cascade", "retinanet"]  # = cachedet.models.build.HEADS
Dtype = Literal[
    "float16", "bfloat16", "float32", "uint8", "uint4", "float8"
]  # = cachedet.cache.schema.DTYPES
Codec = Literal["zstd", "lz4", "none"]  # = cachedet.cache.schema.CODECS
Recipe = Literal["short", "paper"]  # = cachedet.core.recipes.RECIPES
Optimizer = Literal["sgd", "adamw"]
Schedule = Literal["step", "cosine"]
BENCH_REGIMES = (
    "finetune",
    "online_frozen",
    "cached",
    "heads_in_memory",
    "torchvision_frozen",  # = cachedet.tools.bench.BENCH_REGIMES (tests/unit/tools/test_bench.py)
    "torchvision_finetune",
    "adapters_online",
    "adapters_hybrid",
)

DEVICE_HELP = "auto: CUDA when available, else CPU; or cpu, cuda, cuda:N."
SIZE_HELP = f"Side of the square canvas in pixels (default {DEFAULT_CANVAS})."
BATCH_HELP = "Images per training step."
LOADER_WORKERS_HELP = "DataLoader worker processes (0: in the main process)."
SEED_HELP = "Seed of every random draw (views, sampling, initialisation)."
QUIET_HELP = "No progress bar."

# Old spellings, kept for one release: accepted with a warning on stderr, absent from --help.
ALIASES = {
    "extract": {"--workers": "--dask-workers"},
    "train-heads": {"--workers": "--loader-workers"},
    "bench": {"--batch": "--batch-size"},
    "model-info": {"--batch": "--batch-size"},
}

# train-heads option (parameter name) -> TrainConfig field it sets (None: no field); names not
# listed set the field of the same name. --resume compares and overrides settings by field.
DETECTOR_FLAGS = (
    "nasfpn_repeats",
    "cascade_ious",
    "box_convs",
    "box_fcs",
    "mask_convs",
    "mask_channels",
    "box_representation",
    "rois_per_image",
    "proposals_per_image",
)
TRAIN_FIELD_OF = {
    "pretrained": "weights",
    "random_init": "weights",
    "taps": "out_indices",
    "no_amp": "amp",
    "no_verify_reads": "verify_reads",
    "loader_workers": "workers",
    "quiet": None,
    "config": None,
    **{name: "detector_options" for name in DETECTOR_FLAGS},
}
# extract option -> ExtractConfig field (nested fields as "backbone.*" / "augment.*")
EXTRACT_FIELD_OF = {
    "backbone": "backbone.name",
    "weights": "backbone.weights",
    "pretrained": "backbone.weights",
    "random_init": "backbone.weights",
    "out_indices": "backbone.out_indices",
    "taps": "backbone.out_indices",
    "size": "augment.size",
    "scale_range": "augment.scale_range",
    "no_augment": "augment.augment",
    "seed": "augment.seed",
    "copy_paste": "augment.copy_paste",
    "paste_min_visible": "augment.paste_min_visible",
    "dask_workers": "workers",
    "no_masks": "masks",
    "dry_run": None,
    "num_images": None,
    "quiet": None,
}


def flags_of_field(field: str, field_of: dict[str, str | None]) -> str:
    """The option(s) that set a config field, e.g. ``workers`` -> ``--loader-workers`` for train-heads."""
    names = [name for name, f in field_of.items() if f == field] or [field]
    return "/".join("--" + name.replace("_", "-") for name in names)


class Command(TyperCommand):
    """A typer command that accepts the old spellings in ``ALIASES`` (with a warning) before parsing."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        return super().parse_args(ctx, rename_aliases(self.name, args))


def rename_aliases(command: str | None, args: list[str]) -> list[str]:
    """``--batch 2`` / ``--batch=2`` -> ``--batch-size ...`` for the command's old spellings (up to ``--``)."""
    aliases = ALIASES.get(command or "", {})
    out = list(args)
    for i, arg in enumerate(out):
        if arg == "--":
            break
        old, eq, value = arg.partition("=")
        if old in aliases:
            new = aliases[old]
            print(
                f"cachedet: warning: {command} {old} is now {new}; the old spelling goes in the next release",
                file=sys.stderr,
            )
            out[i] = new + eq + value
    return out


def examples(*commands: str) -> str:
    """A help epilog: each command on its own line, under 'Examples'."""
    return "Examples:\n\n" + "\n\n".join(f"  {c}" for c in commands)
