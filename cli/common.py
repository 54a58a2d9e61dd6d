"""Shared CLI plumbing: user errors as one line + exit status 2, and small formatters."""

from __future__ import annotations

import errno
import functools
import sys
import warnings

import typer

from cachedet.core.errors import CachedetError

RECIPE_HELP = (
    "Defaults for the schedule (cachedet.core.recipes): short (LSJ 0.8-1.25, 2-FC box head; the "
    "default) or paper (LSJ 0.1-2.0, 4conv1fc box head, for ~100+ epochs); explicit options win."
)


_COMMANDS: dict[str, object] = {}  # command function name -> function, filled by @user_errors


def user_errors(fn):
    """Run a command; a CachedetError becomes 'cachedet: error: …' on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with warnings.catch_warnings():  # restores the process's warning printer afterwards
                warnings.showwarning = _show_warning
                return fn(*args, **kwargs)
        except CachedetError as e:
            print(f"cachedet: error: {with_flags(error_line(e))}", file=sys.stderr)
            raise typer.Exit(2) from None
        except (
            KeyboardInterrupt
        ) as e:  # Ctrl-C: one line (what was kept, how to go on), no traceback
            print(f"cachedet: {with_flags(str(e)) or 'interrupted'}", file=sys.stderr)
            raise typer.Exit(130) from None
        except OSError as e:  # a full disk or read-only folder that no library call named
            if e.errno not in WRITE_ERRNOS:
                raise
            print(f"cachedet: error: {os_write_error(e)}", file=sys.stderr)
            raise typer.Exit(2) from None

    _COMMANDS[fn.__name__] = fn  # read by flag_of: the commands' options name the fields
    return wrapper


WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT}


def os_write_error(e: OSError) -> str:
    """One line for an OSError of a write: the path, the reason, the space free where known."""
    import os
    import shutil

    path = e.filename or "a file"
    free = ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT) and e.filename:
        try:
            free = f", {human_bytes(shutil.disk_usage(os.path.dirname(os.path.abspath(path)) or '.').free)} free"
        except OSError:
            pass
    return (
        f"{path}: cannot write ({e.strerror or type(e).__name__}{free}); what was written before "
        "is intact: free space or choose a writable place, then rerun the same command"
    )


def error_line(e: CachedetError) -> str:
    """The user's one line: a CachedetError raised in a DataLoader worker reaches the main process
    as torch's "Caught CachedetError in DataLoader worker process N. Original Traceback ...", whose
    last line holds the original message."""
    text = str(e)
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return text


def flag_of() -> dict[str, str]:
    """{config field path (``optim.epochs``): the train-heads option(s) that set it (``--epochs``)},
    read off the command's own options (``TRAIN_FIELD_OF`` names those that differ from the field).
    The commands register with ``@user_errors`` (the CLI's main module imports every command)."""
    import inspect

    from cachedet.engine.config import PATH_OF
    from cachedet_cli.vocabulary import DETECTOR_FLAGS, TRAIN_FIELD_OF

    command = _COMMANDS.get("train_heads_command")
    options = [p for p in inspect.signature(command).parameters if p != "ctx"] if command else []
    by_field: dict[str, list[str]] = {}
    for option in options:
        by_field.setdefault(TRAIN_FIELD_OF.get(option, option), []).append(
            "--" + option.replace("_", "-")
        )
    table = {PATH_OF[f]: "/".join(flags) for f, flags in by_field.items() if f in PATH_OF}
    table.update(
        {f"detector.options.{name}": "--" + name.replace("_", "-") for name in DETECTOR_FLAGS}
    )
    table.update(_extract_flags())
    table.update(_config_flags("eval_command", "EvalConfig", {"quiet": None}))
    table.update(
        _config_flags(
            "bench_command",
            "BenchConfig",
            {"batch_size": "batch", "taps": "out_indices", "regimes": None, "out": None},
        )
    )
    return table


def _config_flags(command_name: str, config: str, field_of: dict) -> dict[str, str]:
    """{``Config.field`` or section path (``augment.size``): the command's option(s) that set it},
    read off the command's own options; ``field_of`` names those that differ from the field (None:
    an option that sets no field)."""
    import inspect

    command = _COMMANDS.get(command_name)
    by_field: dict[str, list[str]] = {}
    for option in inspect.signature(command).parameters if command else ():
        field = field_of.get(option, option)
        if field is not None:
            path = field if "." in field else f"{config}.{field}"
            by_field.setdefault(path, []).append("--" + option.replace("_", "-"))
    return {path: "/".join(flags) for path, flags in by_field.items()}


def _extract_flags() -> dict[str, str]:
    """{ExtractConfig field path (``ExtractConfig.views``, ``augment.size``): extract's option(s)}."""
    from cachedet_cli.vocabulary import EXTRACT_FIELD_OF

    table = _config_flags("extract_command", "ExtractConfig", EXTRACT_FIELD_OF)
    table["augment.augment"] = "--no-augment"  # the option turns the field off
    return table


# A message that starts with one of these bare argument names (``cachedet.load``'s, ``Model``'s)
# shows it as the option of the same name.
BARE_ARGUMENTS = (
    "device",
    "score_threshold",
    "max_detections",
    "batch_size",
    "checkpoint",
    "format",
    "neck",
    "regimes",
)


def with_flags(message: str) -> str:
    """A library message with each config field path (``optim.epochs``) shown as its option (``--epochs``)."""
    import re

    message = re.sub(
        rf"^({'|'.join(BARE_ARGUMENTS)})\b", lambda m: "--" + m.group(1).replace("_", "-"), message
    )
    fields = (
        r"\b(?:TrainConfig|ExtractConfig|EvalConfig|BenchConfig|source|detector|optim|loader|val"
        r"|augment|backbone)\.\w+(?:\.\w+)?\b"
    )
    if not re.search(fields, message):  # the table imports the configs (torch): only when needed
        return message
    table = flag_of()
    return re.sub(fields, lambda m: table.get(m.group(0), m.group(0)), message)


def check_inputs(*inputs: tuple[object, str, str]) -> None:
    """Refuse a local input that is not there before any heavy import (torch, timm, zarr, dask).

    ``inputs``: (value, option, kind) with kind "file", "folder" or "store"; a None value (option not
    given) and remote fsspec URLs pass (the library checks those). Raises CachedetError naming the
    path and the option."""
    import os

    from cachedet.core.paths import is_url, resolve_path

    what = {
        "file": "file not found",
        "folder": "folder not found",
        "store": "no feature store here",
    }
    for value, option, kind in inputs:
        if value is None or is_url(str(value)):
            continue
        path = resolve_path(str(value))
        there = os.path.isfile(path) if kind == "file" else os.path.isdir(path)
        if kind == "store":  # a local zarr store is a folder; a file there is not one either
            there = os.path.exists(path)
        if not there:
            raise CachedetError(f"{path}: {what[kind]} ({option})")


def console():
    """A rich console that prints text verbatim: no markup or highlighting, so a path such as
    ``store [v1].zarr`` reads as it is, and long lines never wrap (paths stay greppable).
    Colour goes through ``style=``."""
    from rich.console import Console

    return Console(soft_wrap=True, markup=False, highlight=False)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"cachedet: warning: {with_flags(str(message))}", file=sys.stderr)


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def human_seconds(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def parse_int_list(text: str | None, option: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.replace(" ", "").split(",") if v != "")
    except ValueError:
        raise CachedetError(
            f"{option} {text}: expected comma-separated integers, e.g. 2,3,4"
        ) from None


def backbone_indices(
    backbone: str, out_indices: str | None, taps: str | None
) -> tuple[int, ...] | None:
    """timm out_indices from --out-indices (CNN levels) or --taps (a plain ViT's blocks); None: the default."""
    from cachedet.backbones.vit import is_vit

    if out_indices is not None and taps is not None:
        raise CachedetError(
            "--taps and --out-indices exclude each other (a ViT's taps are its out_indices)"
        )
    if taps is None:
        return parse_int_list(out_indices, "--out-indices")
    if not is_vit(backbone):
        raise CachedetError(
            f"--taps: {backbone} is not a plain ViT (vit_*, eva*, deit*); choose its levels with --out-indices"
        )
    return parse_int_list(taps, "--taps")


TAPS_HELP = "ViT blocks to store, 0-based, e.g. 3,5,7,11 (-1: last; default: the last block)."


def detector_options(
    nasfpn_repeats: int | None = None,
    cascade_ious: str | None = None,
    box_convs: int | None = None,
    box_fcs: int | None = None,
    mask_convs: int | None = None,
    mask_channels: int | None = None,
    box_representation: int | None = None,
    rois_per_image: int | None = None,
    proposals_per_image: int | None = None,
) -> dict:
    """Detector options from CLI flags; unset flags are left out so the model's defaults apply."""
    opts = {}
    if nasfpn_repeats is not None and nasfpn_repeats != 5:
        opts["nasfpn_repeats"] = nasfpn_repeats
    if cascade_ious:
        try:
            opts["cascade_ious"] = [float(v) for v in cascade_ious.split(",") if v.strip()]
        except ValueError:
            raise CachedetError(
                f"--cascade-ious {cascade_ious}: expected comma-separated numbers, e.g. 0.5,0.6,0.7"
            ) from None
    given = {
        "box_convs": box_convs,
        "box_fcs": box_fcs,
        "mask_convs": mask_convs,
        "mask_channels": mask_channels,
        "box_representation": box_representation,
        "rois_per_image": rois_per_image,
        "proposals_per_image": proposals_per_image,
    }  # ranges: HeadsConfig.validate (detector.options.NAME, shown as --name)
    opts.update({name: value for name, value in given.items() if value is not None})
    return opts


# The backbone's options, shared by extract and train-heads (``panel``: the help panel they sit in).
def backbone_option(panel: str):
    from cachedet_cli.vocabulary import DEFAULT_BACKBONE

    return typer.Option(
        DEFAULT_BACKBONE,
        "--backbone",
        metavar="TIMM_NAME",
        help="timm model name.",
        rich_help_panel=panel,
    )


def weights_option(panel: str):
    return typer.Option(
        None,
        "--weights",
        metavar="PATH",
        help="Local checkpoint for the backbone.",
        rich_help_panel=panel,
    )


def pretrained_option(panel: str):
    return typer.Option(
        False,
        "--pretrained",
        help="timm's own pretrained weights (needs network).",
        rich_help_panel=panel,
    )


def random_init_option(panel: str):
    return typer.Option(
        False,
        "--random-init",
        help="Seeded random backbone weights (timing, tests).",
        rich_help_panel=panel,
    )


def out_indices_option(panel: str):
    return typer.Option(
        None,
        "--out-indices",
        metavar="I,J,K",
        rich_help_panel=panel,
        help="timm feature indices, e.g. 2,3,4 (default: stride 8/16/32).",
    )


def taps_option(panel: str):
    return typer.Option(None, "--taps", metavar="I,J,K", help=TAPS_HELP, rich_help_panel=panel)


def weight_source(weights, pretrained: bool, random_init: bool) -> str:
    """BackboneConfig.weights from --weights PATH / --pretrained / --random-init (default: "default").
    Raises CachedetError when more than one is given."""
    if sum([weights is not None, pretrained, random_init]) > 1:
        raise CachedetError("--weights, --pretrained and --random-init exclude each other")
    return (
        str(weights)
        if weights
        else "timm"
        if pretrained
        else "random"
        if random_init
        else "default"
    )
