"""`raylib synth-cls`: synthetic classification data for `method: heads` and per-task prompts."""

from __future__ import annotations

import click


@click.command("synth-cls")
@click.argument("out_dir")
@click.option("--train-rows", default=1000, show_default=True)
@click.option("--eval-rows", default=200, show_default=True)
@click.option("--task", "tasks", multiple=True, help="domain | operation (default: both, round-robin)")
@click.option("--seed", default=0, show_default=True)
def synth_cls(out_dir: str, train_rows: int, eval_rows: int, tasks: tuple[str, ...], seed: int) -> None:
    """Write classification rows {text, task, label} (train.jsonl, eval.jsonl) to OUT_DIR."""
    from raylib.synthetic import write_classification_dataset

    paths = write_classification_dataset(out_dir, train_rows, eval_rows, tasks or None, seed)
    click.echo(f"wrote {paths['train']} and {paths['eval']}")
