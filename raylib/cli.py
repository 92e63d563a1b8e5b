"""The `raylib` command line.

Errors a user can fix (bad config, missing data) print one line and exit 2; a run that
fails prints a one-paragraph summary and exits 1. Neither prints a traceback
(set RAYLIB_DEBUG=1 to see one).
"""

from __future__ import annotations

import os
import sys
import time

import click

from raylib.errors import RaylibError


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except RaylibError as exc:
            if os.environ.get("RAYLIB_DEBUG"):
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        except Exception as exc:  # a bug or an unforeseen failure: still one paragraph and exit 1
            if os.environ.get("RAYLIB_DEBUG"):
                raise
            click.echo(f"error: {_unexpected(ctx, exc)}", err=True)
            sys.exit(1)


def _unexpected(ctx, exc: BaseException) -> str:
    """One paragraph for an unexpected exception; the traceback goes to a file it names."""
    import tempfile
    import traceback

    command = ctx.invoked_subcommand or "raylib"
    fd, path = tempfile.mkstemp(prefix=f"raylib-{command}-", suffix=".traceback.txt")
    with os.fdopen(fd, "w") as f:
        traceback.print_exception(exc, file=f)
    lines = [line for line in str(exc).splitlines() if line.strip()]
    text = lines[-1].strip().rstrip(".") if lines else ""
    return (f"`raylib {command}` failed: {type(exc).__name__}: {text[:400]}. "
            f"Full traceback in {path} (rerun with RAYLIB_DEBUG=1 to print it).")


@click.group(cls=_Group)
@click.version_option(package_name="raylib")
def main() -> None:
    """Fine-tune, search and serve LLM experts on Ray, from one YAML job."""


_set_option = click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a job field, e.g. --set train.lr=1e-4"
)


@main.command()
@click.argument("job_yaml", type=click.Path(dir_okay=False))
@_set_option
@click.option("--local", is_flag=True, help="one worker on this machine (CPU, or one GPU when present)")
@click.option("--resume", is_flag=True, help="continue the run in output.dir from its latest checkpoint")
@click.option("--address", default=None, help="Ray cluster to run on: ray://HOST:PORT, HOST:PORT or auto (default: $RAY_ADDRESS, else an embedded local Ray)")
@click.option("--quiet", is_flag=True, help="no progress output")
@click.option("--print-deepspeed-config", "print_ds", is_flag=True,
              help="print the DeepSpeed config generated for this job (backend.name: deepspeed) and exit")
def train(job_yaml: str, overrides: tuple[str, ...], local: bool, resume: bool, address: str | None, quiet: bool,
          print_ds: bool) -> None:
    """Run the fine-tuning job JOB_YAML on Ray Train workers."""
    from raylib.config import load_job

    job = load_job(job_yaml, list(overrides))
    if print_ds:
        from raylib.backends import print_deepspeed_config

        print_deepspeed_config(job, local=local)
        return
    from raylib import launch

    if job.provider == "openai":  # the job runs on a fine-tuning API, not on this Ray
        from raylib.errors import ConfigError
        from raylib.providers import train_openai

        for flag, given in (("--local", local), ("--resume", resume), ("--address", address)):
            if given:
                raise ConfigError(flag, "is about a Ray run; provider openai runs at the fine-tuning API",
                                  f"drop {flag}")
        job = launch.resolve_paths(job)

        metrics = train_openai(job, show_progress=not quiet)
        click.echo(f"fine-tuned model: {metrics['fine_tuned_model']} (expert.json in {job.output.dir})")
        return
    result = launch.train(job, address=address, local=local, resume=resume, show_progress=not quiet)
    launch.print_summary(result)


@main.command()
@click.argument("job_yaml", type=click.Path(dir_okay=False))
@_set_option
def validate(job_yaml: str, overrides: tuple[str, ...]) -> None:
    """Check JOB_YAML and its data without starting Ray."""
    from raylib import launch
    from raylib.config import load_job

    job = launch.resolve_paths(load_job(job_yaml, list(overrides)))
    if job.provider == "openai":  # the model lives at the provider: check what is sent
        from raylib.providers import chat_rows

        rows = chat_rows(job, job.data.train, "data.train")
        click.echo(f"ok: provider openai, {job.provider_options.model or job.model.path}; {len(rows)} training rows")
        return
    report = launch.preflight(job, resume=launch.has_run(job.output.dir))
    data = report.summary()
    from raylib import ingest

    if ingest.resolve(job) == "ray":  # the cluster reads the whole source (raylib/ingest.py)
        data = (f"{data} in the first rows (at most {ingest.PREFLIGHT_ROWS}); Ray Data reads the rest on the cluster"
                if report.rows else "read on the cluster (data.loader: ray)")
    click.echo(f"ok: {job.method.name} on {job.model.path}; data: {data}")


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False), default="models/tiny-llama")
@click.option("--seed", default=0, show_default=True)
@click.option("--instruct", is_flag=True, help="the 4-layer base pretrained partly in the alpaca template "
              "(what SVF experts sharpen; about 6.5 minutes on 2 cores)")
@click.option("--family", default=None, help="instead: a tiny random-weight model of this architecture "
              "(llama, gpt2, ..., bert, roberta, deberta_v2, t5, bart), from transformers' config class")
def tiny(out_dir: str, seed: int, instruct: bool, family: str | None) -> None:
    """Build a tiny Llama-style model + tokenizer at OUT_DIR (no hub needed)."""
    from raylib.tiny_models import ALL_FAMILIES, build_family, build_instruct_tiny, build_tiny

    if family is not None:
        if family not in ALL_FAMILIES:
            raise click.BadParameter(f"{family!r}; choose one of {', '.join(ALL_FAMILIES)}", param_hint="--family")
        click.echo(f"tiny {family} model at {build_family(family, out_dir, seed=seed)}")
        return
    click.echo(f"tiny model at {(build_instruct_tiny if instruct else build_tiny)(out_dir, seed=seed)}")


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False), default="data/demo")
@click.option("--train-rows", default=2000, show_default=True)
@click.option("--eval-rows", default=200, show_default=True)
@click.option("--domain", "domains", multiple=True, help="limit to these domains (default: all)")
@click.option("--seed", default=0, show_default=True)
@click.option("--held-out", is_flag=True, help="eval asks only prompts (strings: words) that train never asks")
@click.option("--pairs", is_flag=True, help="rows also carry chosen/rejected answers (for dpo/orpo/simpo/kto)")
def synth(out_dir: str, train_rows: int, eval_rows: int, domains: tuple[str, ...], seed: int, held_out: bool,
          pairs: bool) -> None:
    """Write a synthetic multi-domain task set (train.jsonl, eval.jsonl) to OUT_DIR."""
    from raylib.synthetic import write_dataset

    paths = write_dataset(out_dir, train_rows, eval_rows, domains or None, seed, held_out=held_out, pairs=pairs)
    click.echo(f"wrote {paths['train']} and {paths['eval']}")


@main.command()
@click.option("--job", "job_yaml", default="jobs/examples/lora.yaml", show_default=True)
@click.option("--workers", default=2, show_default=True)
@_set_option
def demo(job_yaml: str, workers: int, overrides: tuple[str, ...]) -> None:
    """Build the tiny model and data, then run the example LoRA job on local Ray workers."""
    from raylib import launch
    from raylib.config import load_job
    from raylib.tiny_models import build_tiny
    from raylib.synthetic import write_dataset

    click.echo("building the tiny model (models/tiny-llama) and synthetic data (data/demo) ...")
    build_tiny("models/tiny-llama")
    if not os.path.isfile("data/demo/train.jsonl"):
        write_dataset("data/demo")
    run_dir = os.path.join("runs", "demo", time.strftime("%Y%m%d-%H%M%S"))
    job = load_job(job_yaml, [f"scaling.num_workers={workers}", f"output.dir={run_dir}", *overrides])
    click.echo(f"running {job_yaml} with {workers} Ray Train workers -> {run_dir}")
    result = launch.train(job)
    launch.print_summary(result)


def _register_commands() -> None:
    """Commands that live with their feature's package."""
    from raylib.cls_cli import synth_cls
    from raylib.eval_cli import eval_command
    from raylib.export import export
    from raylib.params_cli import params
    from raylib.search.commands import cem, tune
    from raylib.serve_cli import serve_command
    from raylib.submit import logs, status, stop, submit

    for command in (tune, cem, params, synth_cls, submit, status, logs, stop, eval_command, export, serve_command):
        main.add_command(command)
    main.add_command(api)


@click.command("api")
@click.option("--host", default="127.0.0.1", show_default=True, help="bind address (non-loopback needs --api-key)")
@click.option("--port", default=8000, show_default=True)
@click.option("--dir", "root", default="runs/api", show_default=True, help="uploaded files and jobs' runs live here")
@click.option("--model", "models", multiple=True, metavar="NAME=PATH", help="a base model clients may fine-tune")
@click.option("--template", default=None, help="job YAML the requests fill in (method, backend, scaling, lr, ...)")
@click.option("--ray-address", default=None, help="Ray job server (default $RAY_API_SERVER_ADDRESS, else "
              "http://127.0.0.1:8265)")
@click.option("--api-key", envvar="RAYLIB_API_KEY", default=None, help="bearer key clients send ($RAYLIB_API_KEY)")
@click.option("--serve-url", default=None, help="a raylib serve app: succeeded jobs' experts are added to it")
@click.option("--serve-key", envvar="RAYLIB_SERVE_KEY", default=None, help="that app's key ($RAYLIB_SERVE_KEY)")
@click.option("--check", is_flag=True, help="validate the options and exit")
def api(host, port, root, models, template, ray_address, api_key, serve_url, serve_key, check):
    """Serve the OpenAI fine-tuning API (files, fine_tuning.jobs) over raylib jobs on this Ray cluster."""
    from raylib.finetune_api import api_command_impl

    api_command_impl(host, port, root, models, template, ray_address, api_key, serve_url, serve_key, check)


_register_commands()


if __name__ == "__main__":  # pragma: no cover
    main()
