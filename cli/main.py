"""Root typer app: ``cachedet <command>``.

Nothing here imports torch or timm: the command modules import the library inside their
functions, so ``cachedet --help`` and ``cachedet CMD --help`` answer without loading them.
"""

from __future__ import annotations

from typing import Optional

import typer

from cachedet_cli import (
    bench,
    cache_info,
    demo,
    eval_predict,
    export,
    extract,
    model_info,
    train_heads,
)
from cachedet_cli.vocabulary import Command

app = typer.Typer(
    name="cachedet",
    help="Train detection heads on cached features of a frozen, classification-pretrained backbone.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def versions() -> str:
    """'cachedet X (torch Y, timm Z)', read from the installed packages' metadata (no import)."""
    from importlib.metadata import PackageNotFoundError, version

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    from cachedet import __version__

    return f"cachedet {__version__} (torch {of('torch')}, timm {of('timm')})"


def _print_version(value: bool) -> None:
    if value:
        print(versions())
        raise typer.Exit()


@app.callback()
def root(
    version: Optional[bool] = typer.Option(
        None,
        "--version",
        callback=_print_version,
        is_eager=True,
        help="Print the versions of cachedet, torch and timm, and exit.",
    ),
):
    """Train detection heads on cached features of a frozen, classification-pretrained backbone."""


app.command("demo", cls=Command, epilog=demo.EXAMPLES)(demo.demo_command)
app.command("extract", cls=Command, epilog=extract.EXAMPLES)(extract.extract_command)
app.add_typer(cache_info.cache_app, name="cache")
app.command("cache-info", hidden=True)(
    cache_info.cache_info_command
)  # the name before `cache info`
app.command("train-heads", cls=Command, epilog=train_heads.EXAMPLES)(
    train_heads.train_heads_command
)
app.command("eval", cls=Command, epilog=eval_predict.EVAL_EXAMPLES)(eval_predict.eval_command)
app.command("predict", cls=Command, epilog=eval_predict.PREDICT_EXAMPLES)(
    eval_predict.predict_command
)
app.command("model-info", cls=Command, epilog=model_info.EXAMPLES)(model_info.model_info_command)
app.command("bench", cls=Command, epilog=bench.EXAMPLES)(bench.bench_command)
app.command("export", cls=Command, epilog=export.EXAMPLES)(export.export_command)


def main():
    app()


if __name__ == "__main__":
    main()
