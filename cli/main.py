"""Root typer app: ``cachedet <command>``."""

from __future__ import annotations

import typer

from cachedet_cli import bench, cache_info, demo, eval_predict, export, extract, model_info, train_heads

app = typer.Typer(
    name="cachedet",
    help="Train detection heads on cached features of a frozen, classification-pretrained backbone.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("demo")(demo.demo_command)
app.command("extract")(extract.extract_command)
app.add_typer(cache_info.cache_app, name="cache")
app.command("cache-info", hidden=True)(cache_info.cache_info_command)  # the name before `cache info`
app.command("train-heads")(train_heads.train_heads_command)
app.command("eval")(eval_predict.eval_command)
app.command("predict")(eval_predict.predict_command)
app.command("model-info")(model_info.model_info_command)
app.command("bench")(bench.bench_command)
app.command("export")(export.export_command)


def main():
    app()


if __name__ == "__main__":
    main()
