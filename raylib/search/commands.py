"""CLI commands of the search package (`raylib tune`), registered in raylib/cli.py."""

from __future__ import annotations

import click


@click.command()
@click.argument("job_yaml", type=click.Path(dir_okay=False))
@click.option("--search", "search_yaml", required=True, type=click.Path(dir_okay=False), help="search space file")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a base-job field")
@click.option("--resume", is_flag=True, help="continue an interrupted search (Tune's restore)")
@click.option("--address", default=None, help="Ray cluster to run on (default: $RAY_ADDRESS, else an embedded local Ray)")
def tune(job_yaml: str, search_yaml: str, overrides: tuple[str, ...], resume: bool, address: str | None) -> None:
    """Search hyperparameters of JOB_YAML with Ray Tune; every trial is a Ray Train run."""
    from raylib.config import apply_override, read_yaml, validate_job
    from raylib.errors import TrainingFailed
    from raylib.search.space import load_search

    raw = read_yaml(job_yaml)
    for item in overrides:
        apply_override(raw, item)
    job = validate_job(raw, source=job_yaml)
    search = load_search(search_yaml, job, raw)

    from raylib.search import tune as tune_mod

    result = tune_mod.run_search(job, search, resume=resume, address=address)
    click.echo(tune_mod.format_table(result, search.metric))
    out = result.search_dir
    click.echo(f"results: {out}/results.csv, plot: {out}/metric_vs_step.png")
    if result.best:
        click.echo(f"best trial {result.best['trial_id']}: {search.metric}={result.best[search.metric]:.4g}, "
                   f"expert {result.best['expert']}, job {out}/best_job.yaml")
    if result.failed:
        lines = "; ".join(f"{f['trial_id']}: {f['error']} (logs: {f['log_dir']})" for f in result.failed)
        raise TrainingFailed(f"{len(result.failed)} of {len(result.rows)} trials failed: {lines}")
    if not result.best:
        raise TrainingFailed(f"no trial finished; see {out}/results.csv")
