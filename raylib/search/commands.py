"""CLI commands of the search package (`raylib tune`), registered in raylib/cli.py."""

from __future__ import annotations

import json
import os

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


@click.command()
@click.option("--experts", "experts", required=True, multiple=True, help="SVF expert directories (repeat, or space-separate)")
@click.option("--fewshot", required=True, type=click.Path(dir_okay=False), help="JSONL few-shot rows (instruction/input/output)")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="where the composed expert is written")
@click.option("--population", type=int, default=16, show_default=True)
@click.option("--elite-frac", type=float, default=0.25, show_default=True)
@click.option("--iterations", type=int, default=5, show_default=True)
@click.option("--init-std", type=float, default=0.5, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--bounds", type=(float, float), default=(-1.0, 2.0), show_default=True, help="LOW HIGH for every alpha")
@click.option("--per-layer", is_flag=True, help="one alpha per expert and decoder layer")
@click.option("--score", default="exact_match", show_default=True, help="exact_match or a reward name / module:function")
@click.option("--loglik-weight", type=float, default=0.0, show_default=True, help="add weight x mean answer log-likelihood")
@click.option("--confidence", type=float, default=0.8, show_default=True,
              help="a mix replaces the best single expert (or the base) only if it beats it on the few-shot rows "
                   "at this confidence (one-sided, paired over rows); 0: the best score wins")
@click.option("--actors", type=int, default=None, help="parallel scoring actors (default: the cluster's CPUs)")
@click.option("--domain", default="cem", show_default=True, help="domain label of the composed expert")
@click.option("--address", default=None, help="Ray cluster to run on (default: $RAY_ADDRESS, else an embedded local Ray)")
def cem(experts, fewshot, out_dir, address, **options) -> None:
    """Mix SVF experts for a new task: CEM search of the mixing weights on few-shot rows."""
    from pydantic import ValidationError

    from raylib.errors import ConfigError
    from raylib.search.cem import CEMOptions, run_cem

    dirs = [d for item in experts for d in item.split()]
    try:
        opts = CEMOptions.model_validate({k: v for k, v in options.items() if v is not None})
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigError(f"--{'-'.join(str(p) for p in err['loc']).replace('_', '-')}", err["msg"]) from None
    result = run_cem(dirs, fewshot, out_dir, opts, address=address)
    singles = ", ".join(f"{os.path.basename(d.rstrip('/'))}={s:.3f}" for d, s in result.single_expert_scores.items())
    alphas = json.dumps(result.alphas if opts.per_layer else [round(a, 4) for a in result.alphas])
    click.echo(f"single experts: {singles}; base={result.base_score:.3f}")
    if result.best_mix:
        m = result.best_mix
        click.echo(f"best mix: score {m['score']:.3f}, {m['gain_z']:+.2f} standard errors over the best single "
                   f"expert or base (needed: {result.required_gain_z:.2f})")
    kept = {"mix": "the mix", "base": "the base model (α = 0)"}.get(result.selected, f"expert {result.selected}")
    click.echo(f"result: {kept}, alphas {alphas}, score {result.score:.3f}")
    click.echo(f"composed expert: {result.expert_dir} (cem.json, convergence.png)")
