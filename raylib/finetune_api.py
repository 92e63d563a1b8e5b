"""`raylib api`: the OpenAI fine-tuning API, backed by raylib jobs on the Ray cluster it runs on.

A user with only the official `openai` client fine-tunes on their own cluster:

    POST /v1/files                          upload a training/validation JSONL (purpose fine-tune)
    GET  /v1/files/{id}
    POST /v1/fine_tuning/jobs               {model, training_file, validation_file?, hyperparameters?,
                                             method? (supervised), suffix?, seed?}
    GET  /v1/fine_tuning/jobs               newest first (after, limit)
    GET  /v1/fine_tuning/jobs/{id}
    GET  /v1/fine_tuning/jobs/{id}/events   the run's progress (steps, evals, status), newest first
    POST /v1/fine_tuning/jobs/{id}/cancel

Every route needs the bearer key (`--api-key` / $RAYLIB_API_KEY). A job is a raylib job built
from a template (`--template job.yaml`: method, backend, scaling and defaults chosen by whoever
runs the API; a LoRA SFT template without one) with the request filled in: `model` names one
of the base models the API was started with (`--model NAME=PATH`), the files are OpenAI chat
rows (`{"messages": [...]}`: `data.template: chat`), `n_epochs` / `batch_size` map to
`train.epochs` / `train.batch_size`, `learning_rate_multiplier` scales the template's
`train.lr`, `seed` is `train.seed`. The job is validated here, its data checked (a file with
no usable rows is a 400 naming it), and only then submitted as a Ray job
(`python -m raylib.job_entry`, the `raylib submit` entry). Statuses come from Ray's job
status (PENDING queued, RUNNING running, SUCCEEDED succeeded, FAILED failed, STOPPED
cancelled); events from the run's progress log (`metrics.jsonl`).

A succeeded job's expert is `fine_tuned_model` (`ft-<model>-<suffix>-<job id>`); with
`--serve-url` the API registers it with the serving app (`POST /admin/experts`, the app's key
`--serve-key`) the first time the job is read as succeeded, so the model answers requests at
that name.
"""

from __future__ import annotations

import copy
import json
import os
import re
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml
from fastapi import Depends, FastAPI, File, Form, Request, UploadFile  # route signatures resolve at module level
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt

JOB_ENV = "RAYLIB_JOB_YAML"

#: the job a request fills in when the API runs without --template
DEFAULT_TEMPLATE: dict[str, Any] = {
    "model": {"path": "<model>"},
    "data": {"train": "<training_file>", "template": "chat", "format": "messages", "max_length": 512},
    "method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
    "train": {"lr": 2.0e-4, "epochs": 3, "batch_size": 8, "checkpoint_every": 50, "lr_scheduler": "linear"},
    "output": {"dir": "<run>"},
}


# --------------------------------------------------------------------------- requests


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Hyperparameters(_Strict):
    n_epochs: PositiveInt | Literal["auto"] | None = Field(None, description="train.epochs")
    batch_size: PositiveInt | Literal["auto"] | None = Field(None, description="train.batch_size")
    learning_rate_multiplier: PositiveFloat | Literal["auto"] | None = Field(None, description="x the template's train.lr")


class Supervised(_Strict):
    hyperparameters: Hyperparameters | None = None


class MethodSpec(_Strict):
    type: Literal["supervised"]
    supervised: Supervised | None = None


class CreateJob(_Strict):
    model: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: Hyperparameters | None = None
    method: MethodSpec | None = None
    suffix: str | None = Field(None, max_length=64)
    seed: int | None = None
    metadata: dict[str, str] | None = None
    integrations: list[dict] | None = None


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


# --------------------------------------------------------------------------- the service


@dataclass
class Settings:
    root: str  # files/ and jobs/ live here
    models: dict[str, str]  # model name -> base model path
    template: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(DEFAULT_TEMPLATE))
    ray_address: str = "http://127.0.0.1:8265"
    api_key: str | None = None
    serve_url: str | None = None
    serve_key: str | None = None


class FineTuning:
    """Files, jobs and their Ray jobs; one JSON record per job under `root/jobs/<id>/`."""

    STATUS = {"PENDING": "queued", "RUNNING": "running", "SUCCEEDED": "succeeded", "FAILED": "failed",
              "STOPPED": "cancelled"}

    def __init__(self, settings: Settings):
        self.s = settings
        self.files_dir = os.path.join(settings.root, "files")
        self.jobs_dir = os.path.join(settings.root, "jobs")
        os.makedirs(self.files_dir, exist_ok=True)
        os.makedirs(self.jobs_dir, exist_ok=True)
        self._lock = threading.Lock()
        self._client = None

    # ------------------------------------------------------------------ files

    def add_file(self, filename: str, purpose: str, content: bytes) -> dict:
        if purpose != "fine-tune":
            raise ApiError(400, f"purpose {purpose!r}: this API stores fine-tuning files only", param="purpose")
        rows = 0
        for i, line in enumerate(content.decode("utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise ApiError(400, f"{filename} line {i} is not JSON: {exc}", param="file") from None
            if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
                raise ApiError(400, f"{filename} line {i}: each line must be {{\"messages\": [...]}} (chat format)",
                               param="file")
            rows += 1
        if not rows:
            raise ApiError(400, f"{filename} has no rows", param="file")
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        with open(os.path.join(self.files_dir, file_id + ".jsonl"), "wb") as f:
            f.write(content)
        meta = {"id": file_id, "object": "file", "bytes": len(content), "created_at": int(time.time()),
                "filename": filename, "purpose": purpose, "status": "processed"}
        _write_json(os.path.join(self.files_dir, file_id + ".json"), meta)
        return meta

    def file(self, file_id: str, param: str = "file_id") -> dict:
        path = os.path.join(self.files_dir, os.path.basename(file_id) + ".json")
        if not os.path.isfile(path):
            raise ApiError(404 if param == "file_id" else 400, f"no file {file_id!r}", param=param,
                           code="file_not_found" if param == "file_id" else None)
        return json.load(open(path))

    def _file_path(self, file_id: str) -> str:
        return os.path.join(self.files_dir, os.path.basename(file_id) + ".jsonl")

    # ------------------------------------------------------------------ jobs

    def create_job(self, req: CreateJob) -> dict:
        from raylib import launch
        from raylib.config import validate_job
        from raylib.errors import ConfigError, DataError

        if req.model not in self.s.models:
            raise ApiError(400, f"model {req.model!r} is not one this API fine-tunes; choose one of "
                           f"{sorted(self.s.models)}", param="model", code="model_not_found")
        if req.integrations:
            raise ApiError(400, "integrations are not supported (raylib tracks runs itself: output.tracking)",
                           param="integrations")
        self.file(req.training_file, "training_file")
        if req.validation_file:
            self.file(req.validation_file, "validation_file")
        hp = req.hyperparameters or Hyperparameters()
        if req.method is not None and req.method.supervised and req.method.supervised.hyperparameters:
            if req.hyperparameters is not None:
                raise ApiError(400, "give hyperparameters once: at the top or in method.supervised", param="hyperparameters")
            hp = req.method.supervised.hyperparameters
        job_id = f"ftjob-{uuid.uuid4().hex[:24]}"
        job_dir = os.path.join(self.jobs_dir, job_id)
        raw = copy.deepcopy(self.s.template)
        raw.setdefault("model", {})["path"] = self.s.models[req.model]
        data = raw.setdefault("data", {})
        data.update(train=self._file_path(req.training_file), template="chat", format="messages")
        data["eval"] = self._file_path(req.validation_file) if req.validation_file else None
        train = raw.setdefault("train", {})
        if isinstance(hp.n_epochs, int):
            train["epochs"], train["max_steps"] = hp.n_epochs, None
        if isinstance(hp.batch_size, int):
            train["batch_size"] = hp.batch_size
        if isinstance(hp.learning_rate_multiplier, float | int):
            train["lr"] = float(train.get("lr", 2e-4)) * hp.learning_rate_multiplier
        if req.seed is not None:
            train["seed"] = req.seed
        out = raw.setdefault("output", {})
        out["dir"] = os.path.join(job_dir, "run")
        out["domain"] = req.suffix or out.get("domain")
        try:
            job = validate_job(raw, source="fine-tuning job")
            launch.preflight(job, probe=False)
        except (ConfigError, DataError) as exc:
            param = ("training_file" if exc.field == "data.train" else "validation_file" if exc.field == "data.eval"
                     else "hyperparameters" if exc.field.startswith("train.") else None)
            raise ApiError(400, str(exc), param=param) from None
        record = {
            "id": job_id, "model": req.model, "created_at": int(time.time()), "training_file": req.training_file,
            "validation_file": req.validation_file, "suffix": req.suffix, "seed": job.train.seed,
            "metadata": req.metadata, "run_dir": job.output.dir,
            "hyperparameters": {"n_epochs": job.train.epochs, "batch_size": job.train.batch_size,
                                "learning_rate_multiplier": job.train.lr / float(self.s.template.get("train", {})
                                                                                 .get("lr", 2e-4))},
            "fine_tuned_model": served_name(req.model, req.suffix, job_id),
        }
        try:
            self.client().submit_job(
                entrypoint=f"{sys.executable} -m raylib.job_entry --job-env {JOB_ENV}", submission_id=job_id,
                runtime_env={"env_vars": {JOB_ENV: yaml.safe_dump(job.to_dict(), sort_keys=False)}},
                metadata={"raylib_fine_tuning_job": job_id})
        except Exception as exc:  # no record is left behind: the job does not exist
            raise ApiError(503, f"the Ray cluster did not take the job: {' '.join(str(exc).split())[:300]}",
                           code="cluster_unavailable") from None
        os.makedirs(job_dir, exist_ok=True)
        with open(os.path.join(job_dir, "job.yaml"), "w") as f:
            yaml.safe_dump(job.to_dict(), f, sort_keys=False)
        _write_json(os.path.join(job_dir, "record.json"), record)
        return self.job(job_id)

    def client(self):
        if self._client is None:
            from raylib.submit import client

            self._client = client(self.s.ray_address)
        return self._client

    def _record(self, job_id: str) -> dict:
        path = os.path.join(self.jobs_dir, os.path.basename(job_id), "record.json")
        if not os.path.isfile(path):
            raise ApiError(404, f"no fine-tuning job {job_id!r}", param="fine_tuning_job_id", code="not_found")
        return json.load(open(path))

    def job(self, job_id: str) -> dict:
        """The OpenAI FineTuningJob object, from the record and Ray's job info."""
        rec = self._record(job_id)
        try:
            info = self.client().get_job_info(job_id)
        except Exception as exc:
            raise ApiError(503, f"the Ray cluster does not answer: {' '.join(str(exc).split())[:300]}",
                           code="cluster_unavailable") from None
        status = self.STATUS.get(info.status.value, "queued")
        run = _read_json(os.path.join(rec["run_dir"], "run.json")) or {}
        metrics = run.get("metrics") or {}
        error = None
        if status == "failed":
            error = {"code": "training_failed", "message": _failure(info, rec["run_dir"]), "param": None}
        if status == "succeeded" and not os.path.isfile(os.path.join(rec["run_dir"], "expert.json")):
            status, error = "failed", {"code": "no_expert", "message": "the run ended without an expert", "param": None}
        if status == "succeeded":
            self._serve(rec)
        return {
            "id": job_id, "object": "fine_tuning.job", "model": rec["model"], "created_at": rec["created_at"],
            "finished_at": int(info.end_time / 1000) if info.end_time and status in ("succeeded", "failed",
                                                                                     "cancelled") else None,
            "fine_tuned_model": rec["fine_tuned_model"] if status == "succeeded" else None,
            "organization_id": "raylib", "result_files": [], "status": status,
            "training_file": rec["training_file"], "validation_file": rec["validation_file"],
            "hyperparameters": rec["hyperparameters"], "seed": rec["seed"], "error": error,
            "trained_tokens": metrics.get("tokens_seen"), "metadata": rec.get("metadata"),
            "method": {"type": "supervised", "supervised": {"hyperparameters": rec["hyperparameters"]}},
        }

    def jobs(self, after: str | None, limit: int) -> dict:
        records = [_read_json(os.path.join(self.jobs_dir, d, "record.json")) for d in os.listdir(self.jobs_dir)]
        ordered = sorted((r for r in records if r), key=lambda r: (r["created_at"], r["id"]), reverse=True)
        ids = [r["id"] for r in ordered]
        start = ids.index(after) + 1 if after in ids else 0
        page = ids[start:start + limit]
        return {"object": "list", "data": [self.job(i) for i in page], "has_more": start + limit < len(ids)}

    def cancel(self, job_id: str) -> dict:
        self._record(job_id)
        c = self.client()
        if not c.get_job_status(job_id).is_terminal():
            c.stop_job(job_id)
            from raylib.submit import wait_status

            wait_status(c, job_id, timeout=60)
        return self.job(job_id)

    def events(self, job_id: str, after: str | None, limit: int) -> dict:
        """The run's progress as events, newest first: created, the start, every step and eval,
        the end (succeeded / failed / cancelled)."""
        rec = self._record(job_id)
        job = self.job(job_id)
        events = [_event(job_id, 0, rec["created_at"], "message", "Created fine-tuning job")]
        log = os.path.join(rec["run_dir"], "metrics.jsonl")
        if os.path.isfile(log):
            for line in open(log):
                try:
                    e = json.loads(line)
                except ValueError:
                    continue
                made = _progress_event(job_id, len(events), e)
                if made is not None:
                    events.append(made)
        if job["status"] in ("succeeded", "failed", "cancelled"):
            text = {"succeeded": "The job has successfully completed", "cancelled": "The job was cancelled",
                    "failed": f"The job failed: {(job['error'] or {}).get('message', '')}"}[job["status"]]
            events.append(_event(job_id, len(events), job["finished_at"] or int(time.time()), "message", text,
                                 level="error" if job["status"] == "failed" else "info"))
        events.reverse()
        ids = [e["id"] for e in events]
        start = ids.index(after) + 1 if after in ids else 0
        return {"object": "list", "data": events[start:start + limit], "has_more": start + limit < len(events)}

    def _serve(self, rec: dict) -> None:
        """Register a succeeded job's expert with the serving app, once (`--serve-url`)."""
        if not self.s.serve_url or rec.get("served"):
            return
        import urllib.request

        with self._lock:
            rec = self._record(rec["id"])
            if rec.get("served"):
                return
            body = json.dumps({"name": rec["fine_tuned_model"], "path": rec["run_dir"]}).encode()
            request = urllib.request.Request(self.s.serve_url.rstrip("/") + "/admin/experts", data=body, method="POST",
                                             headers={"Content-Type": "application/json",
                                                      **({"Authorization": f"Bearer {self.s.serve_key}"}
                                                         if self.s.serve_key else {})})
            try:
                with urllib.request.urlopen(request, timeout=120) as response:  # noqa: S310 - the operator's URL
                    response.read()
            except Exception as exc:  # the job stays succeeded; the next read tries again
                import logging

                logging.getLogger("raylib").warning("could not register %s with %s: %s", rec["fine_tuned_model"],
                                                    self.s.serve_url, exc)
                return
            rec["served"] = True
            _write_json(os.path.join(self.jobs_dir, rec["id"], "record.json"), rec)


def served_name(model: str, suffix: str | None, job_id: str) -> str:
    """The fine-tuned model's name: `ft-<model>-<suffix>-<id>`, in the letters a serving app's
    expert names allow ([A-Za-z0-9_-], at most 64), so it is the model name clients send."""
    def clean(text: str, width: int) -> str:
        return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")[:width] or "x"

    return f"ft-{clean(model, 20)}-{clean(suffix or 'raylib', 16)}-{job_id.removeprefix('ftjob-')[:24]}"


def _param(err: dict) -> str:
    """The request field a validation error is about: its location's field names (pydantic adds
    the union member it tried, e.g. `constrained-int`), with the unknown key for extra fields."""
    model, parts = CreateJob, []
    loc = [p for p in err["loc"] if p != "body"]
    for i, part in enumerate(loc):
        fields = getattr(model, "model_fields", {})
        if isinstance(part, str) and part in fields:
            parts.append(part)
            model = next((a for a in (fields[part].annotation, *getattr(fields[part].annotation, "__args__", ()))
                          if isinstance(a, type) and issubclass(a, BaseModel)), None)
        elif isinstance(part, int):
            parts.append(str(part))
        else:
            if err.get("type") == "extra_forbidden" and i == len(loc) - 1:
                parts.append(str(part))
            break
    return ".".join(parts)


def _event(job_id: str, n: int, created: int, kind: str, message: str, data: dict | None = None,
           level: str = "info") -> dict:
    return {"id": f"ftevent-{job_id.removeprefix('ftjob-')}-{n:06d}", "object": "fine_tuning.job.event",
            "created_at": int(created), "level": level, "message": message, "type": kind, "data": data}


def _progress_event(job_id: str, n: int, e: dict) -> dict | None:
    now = int(e.get("time") or time.time())
    if e.get("type") == "start":
        return _event(job_id, n, now, "message", f"Training started: {e.get('total_steps')} steps, data: {e.get('data')}")
    if e.get("type") == "step" and isinstance(e.get("loss"), (int, float)):
        data = {"step": e["step"], "total_steps": e.get("total_steps"), "train_loss": e["loss"],
                "learning_rate": e.get("lr")}
        return _event(job_id, n, now, "metrics", f"Step {e['step']}/{e.get('total_steps')}: training loss={e['loss']:.4f}",
                      data)
    if e.get("type") == "eval" and isinstance(e.get("eval_loss"), (int, float)):
        data = {"step": e["step"], "valid_loss": e["eval_loss"],
                "valid_mean_token_accuracy": e.get("eval_token_accuracy")}
        return _event(job_id, n, now, "metrics", f"Step {e['step']}: validation loss={e['eval_loss']:.4f}", data)
    return None


def _failure(info, run_dir: str) -> str:
    run = _read_json(os.path.join(run_dir, "run.json"))
    message = (info.message or "").strip()
    return " ".join(message.split())[:500] or (f"see {run_dir}" if run is None else "the run failed")


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- HTTP


def build_app(settings: Settings):
    service = FineTuning(settings)
    app = FastAPI(title="raylib fine-tuning API")

    def error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
        kind = {401: "authentication_error", 404: "not_found_error"}.get(status, "invalid_request_error")
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return error(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        param = _param(first)
        return error(400, f"{param}: {first['msg']}", param)

    async def authorized(request: Request) -> None:
        if settings.api_key and request.headers.get("authorization") != f"Bearer {settings.api_key}":
            raise ApiError(401, "a valid API key is required (Authorization: Bearer ...)", code="invalid_api_key")

    async def run(fn, *args):
        import anyio

        return await anyio.to_thread.run_sync(fn, *args)  # Ray's job client blocks

    @app.post("/v1/files", dependencies=[Depends(authorized)])
    async def upload(file: UploadFile = File(...), purpose: str = Form(...)):
        return await run(service.add_file, file.filename or "upload.jsonl", purpose, await file.read())

    @app.get("/v1/files/{file_id}", dependencies=[Depends(authorized)])
    async def get_file(file_id: str):
        return service.file(file_id)

    @app.post("/v1/fine_tuning/jobs", dependencies=[Depends(authorized)])
    async def create(req: CreateJob):
        return await run(service.create_job, req)

    @app.get("/v1/fine_tuning/jobs", dependencies=[Depends(authorized)])
    async def list_jobs(after: str | None = None, limit: int = 20):
        return await run(service.jobs, after, limit)

    @app.get("/v1/fine_tuning/jobs/{job_id}", dependencies=[Depends(authorized)])
    async def retrieve(job_id: str):
        return await run(service.job, job_id)

    @app.get("/v1/fine_tuning/jobs/{job_id}/events", dependencies=[Depends(authorized)])
    async def events(job_id: str, after: str | None = None, limit: int = 20):
        return await run(service.events, job_id, after, limit)

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel", dependencies=[Depends(authorized)])
    async def cancel(job_id: str):
        return await run(service.cancel, job_id)

    return app


# --------------------------------------------------------------------------- command


def _models(values: tuple[str, ...]) -> dict[str, str]:
    from raylib.errors import ConfigError

    out = {}
    for item in values:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError("--model", f"{item!r} is not NAME=PATH", "write e.g. --model llama-8b=/models/llama-8b")
        out[name] = os.path.abspath(path) if os.path.exists(path) else path
    if not out:
        raise ConfigError("--model", "no base model to fine-tune", "pass --model NAME=PATH (repeatable)")
    return out


def api_command_impl(host: str, port: int, root: str, models: tuple[str, ...], template: str | None,
                     ray_address: str | None, api_key: str | None, serve_url: str | None, serve_key: str | None,
                     check: bool) -> None:
    import click

    from raylib.config import read_yaml
    from raylib.errors import ConfigError

    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        raise ConfigError("--host", f"binding {host} without an API key exposes training on your cluster",
                          "set --api-key (or $RAYLIB_API_KEY), or bind 127.0.0.1")
    settings = Settings(root=os.path.abspath(root), models=_models(models), api_key=api_key, serve_url=serve_url,
                        serve_key=serve_key, ray_address=ray_address or os.environ.get("RAY_API_SERVER_ADDRESS")
                        or "http://127.0.0.1:8265")
    if template:
        settings.template = read_yaml(template, what="job template")
    if check:
        click.echo(f"ok: {len(settings.models)} base models, jobs under {settings.root}")
        return
    import uvicorn

    click.echo(f"fine-tuning API on http://{host}:{port}/v1 (jobs on {settings.ray_address})", err=True)
    uvicorn.run(build_app(settings), host=host, port=port, log_level="warning")
