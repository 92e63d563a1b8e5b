"""Where a job trains (`provider`): `ray` (default: raylib's own Ray Train run, `launch.train`)
or `openai`: any OpenAI-compatible fine-tuning API through the official `openai` client
(OpenAI's own, or `raylib api` on another Ray cluster).

The openai provider takes the same job YAML as far as it maps: `data.train` / `data.eval`
(rows of any format raylib reads, sent as chat rows `{"messages": [...]}`; instruction rows
become a user and an assistant message), `train.epochs` -> n_epochs, `train.batch_size`,
`train.seed`, `provider_options.learning_rate_multiplier`, `provider_options.model` (default
`model.path`), `provider_options.suffix` (default `output.domain`). Any other field set to
something but its default is an exit-2 error naming it (nothing is silently dropped). The run
uploads the files, creates the job, prints its events as progress (and keeps them in
`<output.dir>/metrics.jsonl`), and on success writes `expert.json` with the provider's model
id (`fine_tuned_model`) and run.json; a failed or cancelled job exits 1, as a failed Ray run.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat

from raylib.errors import ConfigError, TrainingFailed


class ProviderOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base_url: str | None = Field(None, description="the API's base URL (default: the openai client's, $OPENAI_BASE_URL)")
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the API key")
    model: str | None = Field(None, description="the provider's base model name (default: model.path)")
    suffix: str | None = Field(None, max_length=64, description="default: output.domain")
    learning_rate_multiplier: PositiveFloat | None = None
    poll_s: PositiveFloat = Field(2.0, description="seconds between status polls")


#: fields the openai provider maps (everything else must keep its default)
MAPPED = {"model.path", "data.train", "data.eval", "data.template", "data.format", "data.fields", "data.max_rows",
          "train.epochs", "train.batch_size", "train.seed", "output.dir", "output.domain", "output.experiment",
          "method.name", "provider", "provider_options"}


def check(job) -> None:
    """Driver-side: the provider's options are given, and no job field it cannot send is set."""
    if job.provider == "ray":
        if job.provider_options is not None:
            raise ConfigError("provider_options", "are options of provider openai", "remove them, or set provider: openai")
        return
    if job.provider_options is None:
        raise ConfigError("provider_options", "provider openai needs its options (at least the API to talk to)",
                          "set provider_options: {base_url: https://..., model: <base model name>}")
    if job.data.template == "plain":
        raise ConfigError("data.template", "the fine-tuning API trains on conversations; plain text rows have none",
                          "use instruction/output rows (alpaca) or chat rows")
    if job.objective.name != "sft":
        raise ConfigError("objective.name", f"provider openai runs supervised fine-tuning, not {job.objective.name}",
                          "use provider: ray for other objectives")
    for path in _changed_fields(job):
        if path not in MAPPED and not any(path.startswith(m + ".") for m in MAPPED):
            raise ConfigError(path, "is not sent to the fine-tuning API by provider openai",
                              "remove it (the provider's service chooses), or use provider: ray")
    if job.method.name not in ("lora", "full"):
        raise ConfigError("method.name", f"provider openai runs the service's supervised fine-tuning, not "
                          f"{job.method.name}", "set method.name: lora (the service decides how it trains)")


def _changed_fields(job) -> list[str]:
    """Dotted paths where the job differs from the same job with nothing but its required
    fields (what the user set, or a default they changed)."""
    d = job.model_dump(mode="json")
    minimal = {"model": {"path": d["model"]["path"]}, "data": {"train": d["data"]["train"]},
               "method": {"name": d["method"]["name"]}, "output": {"dir": d["output"]["dir"]}}
    return sorted(_diff(d, type(job).model_validate(minimal).model_dump(mode="json")))


def _diff(a: dict, b: dict, prefix: str = ""):
    for k, v in a.items():
        if isinstance(v, dict) and isinstance(b.get(k), dict):
            yield from _diff(v, b[k], f"{prefix}{k}.")
        elif v != b.get(k):
            yield f"{prefix}{k}"


def chat_rows(job, source: str, field: str) -> list[dict]:
    """The rows of `source` as OpenAI chat rows, or a DataError naming `field`."""
    from raylib import data as data_mod
    from raylib.errors import DataError

    report = data_mod.DataReport()
    rows = data_mod.valid_rows(data_mod.load_rows(source, field), job.data, report,
                               job.data.max_rows if field == "data.train" else None)
    out = []
    f = job.data.fields
    for row in rows:
        if job.data.template == "chat":
            msgs, _ = data_mod.conversation(row, job.data)
        else:
            prompt = row[f.instruction] + (f"\n\n{row[f.input]}" if row.get(f.input) else "")
            msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(row[f.output])}]
        if msgs:
            out.append({"messages": msgs})
    if not out:
        raise DataError(field, f"{source!r} has no usable rows", "check data.template and data.fields")
    return out


def train_openai(job, show_progress: bool = True, stream=sys.stderr) -> dict[str, Any]:
    """Run the job on an OpenAI-compatible fine-tuning API; returns its metrics (with the
    provider's `fine_tuned_model` and job id) once expert.json and run.json are written."""
    from openai import APIConnectionError, APIStatusError, OpenAI

    from raylib.experts import ExpertInfo, write_expert_json

    opts = job.provider_options
    out = job.output.dir
    if os.path.isfile(os.path.join(out, "expert.json")):
        raise ConfigError("output.dir", f"{out!r} already holds an expert", "set output.dir to a new directory")
    key = os.environ.get(opts.api_key_env)
    if not key:
        raise ConfigError("provider_options.api_key_env", f"${opts.api_key_env} is not set",
                          f"export {opts.api_key_env}=<the API's key>")
    train_rows = chat_rows(job, job.data.train, "data.train")
    eval_rows = chat_rows(job, job.data.eval, "data.eval") if job.data.eval else None
    os.makedirs(out, exist_ok=True)
    client = OpenAI(base_url=opts.base_url, api_key=key)
    started = time.time()
    model = opts.model or job.model.path
    try:
        training_file = client.files.create(file=("train.jsonl", _jsonl(train_rows)), purpose="fine-tune").id
        validation_file = (client.files.create(file=("eval.jsonl", _jsonl(eval_rows)), purpose="fine-tune").id
                           if eval_rows else None)
        hyper: dict[str, Any] = {"n_epochs": job.train.epochs, "batch_size": job.train.batch_size}
        if opts.learning_rate_multiplier is not None:
            hyper["learning_rate_multiplier"] = opts.learning_rate_multiplier
        ft = client.fine_tuning.jobs.create(
            model=model, training_file=training_file, validation_file=validation_file, seed=job.train.seed,
            suffix=opts.suffix or job.output.domain, method={"type": "supervised", "supervised": {"hyperparameters": hyper}})
        _say(stream, show_progress, f"fine-tuning job {ft.id} created on {client.base_url} ({model})")
        seen: set[str] = set()
        with open(os.path.join(out, "metrics.jsonl"), "a") as log:
            while True:
                ft = client.fine_tuning.jobs.retrieve(ft.id)
                for event in reversed(client.fine_tuning.jobs.list_events(ft.id, limit=100).data):
                    if event.id in seen:
                        continue
                    seen.add(event.id)
                    log.write(json.dumps({"type": "provider_event", "message": event.message,
                                          **(event.data if isinstance(event.data, dict) else {})}) + "\n")
                    log.flush()
                    _say(stream, show_progress, event.message)
                if ft.status in ("succeeded", "failed", "cancelled"):
                    break
                time.sleep(opts.poll_s)
    except APIStatusError as exc:
        raise TrainingFailed(f"the fine-tuning API refused: {exc.status_code} {_api_message(exc)}") from exc
    except APIConnectionError as exc:
        raise TrainingFailed(f"cannot reach the fine-tuning API at {client.base_url}: {exc}") from exc
    if ft.status != "succeeded":
        why = ft.error.message if ft.error is not None else ft.status
        raise TrainingFailed(f"fine-tuning job {ft.id} {ft.status}: {why}")
    metrics = {"trained_tokens": ft.trained_tokens, "wall_time_s": round(time.time() - started, 2),
               "fine_tuned_model": ft.fine_tuned_model, "provider_job": ft.id}
    info = ExpertInfo(method=job.method.name, base_model=model, domain=job.output.domain, template=job.data.template,
                      metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))}, config=job.to_dict(),
                      provider="openai", fine_tuned_model=ft.fine_tuned_model)
    write_expert_json(out, info)
    with open(os.path.join(out, "run.json"), "w") as f:
        json.dump({"provider": "openai", "base_url": str(client.base_url), "job": ft.model_dump(mode="json"),
                   "metrics": metrics}, f, indent=2)
    return metrics


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _api_message(exc) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error") if isinstance(body.get("error"), dict) else body
        return str(err.get("message") or body)
    return str(exc)


def _say(stream, enabled: bool, text: str) -> None:
    if enabled:
        print(text, file=stream, flush=True)
