"""The job schema: one YAML file describes one piece of work.

The same validated `JobConfig` drives `raylib train` (local or cluster), `jobs/finetune.py`
under `ray job submit`, and the base of a `raylib tune` search. Validation happens here,
before Ray starts: unknown keys are errors, and every error names the field and the fix.

Relative paths in a job resolve against the current working directory (for `ray job
submit`, that is the job's working_dir on the cluster).
"""

from __future__ import annotations

import difflib
import os
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator

from raylib import backends, best, providers
from raylib.providers import ProviderOptions
from raylib.errors import ConfigError
from raylib.methods import METHODS
from raylib.objectives import OBJECTIVE_OPTIONS, ObjectiveOptions, SFTOptions, check_objective


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Strict):
    path: str = Field(description="local directory or hub id of the base model (from_pretrained)")
    family: Literal["auto", "causal", "seq2seq", "encoder"] = Field(
        "auto", description="decoder LM, encoder-decoder (T5, BART) or encoder (BERT, RoBERTa, DeBERTa); "
        "auto: from the model's config")
    tokenizer: str | None = Field(None, description="defaults to model.path")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    quantization: Literal["nf4", "fp4", "int8"] | None = None
    double_quant: bool = True
    trust_remote_code: bool = False
    revision: str | None = None
    attn_implementation: str | None = None


class FieldMap(_Strict):
    """Column names in the data source."""

    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    text: str = "text"
    messages: str = "messages"
    label: str = "label"   # classification: class name (or index) per row
    task: str = "task"     # classification: which head a row belongs to
    conversations: str = "conversations"  # sharegpt / turns rows: the list of turns
    prompt: str = "prompt"          # preference objectives: the prompt (text or chat messages)
    chosen: str = "chosen"          # ... the preferred answer
    rejected: str = "rejected"      # ... the dispreferred answer
    completion: str = "completion"  # kto: one answer, judged by `label` (true = desirable)


class DataConfig(_Strict):
    train: str = Field(description="JSONL/JSON/CSV/parquet file or directory, s3:// / gs:// URI (loader ray), "
                       "a saved dataset directory, or hf:<dataset id>[:split]")
    eval: str | None = None
    eval_split: float = Field(0.1, ge=0, lt=1, description="held-out share when data.eval is unset")
    template: Literal["alpaca", "chat", "plain"] = "alpaca"
    format: Literal["auto", "instruction", "messages", "sharegpt", "turns"] = Field(
        "auto", description="row shape: instruction/input/output, `messages` [{role, content}], ShareGPT "
        "`conversations` [{from, value}], or `conversations` of {input, output} turns; auto: per row")
    fields: FieldMap = Field(default_factory=FieldMap)
    max_length: PositiveInt = 512
    packing: bool = True
    train_on_prompt: bool = False
    too_long: Literal["drop", "truncate"] = "drop"
    max_rows: PositiveInt | None = None
    loader: Literal["auto", "local", "ray"] = Field(
        "auto", description="ray: Ray Data reads, tokenizes and packs on the cluster and each worker streams its "
        "shard (sft); local: every worker prepares the data itself; auto: ray for sft on more than one worker")


class BackendConfig(_Strict):
    """accelerate (DDP), deepspeed (ZeRO 2/3) or fsdp (PyTorch FSDP2 through Accelerate); see
    raylib/backends.py and README "Backends". Activation checkpointing is train.gradient_checkpointing
    on every backend (under fsdp: Accelerate's per-block activation checkpointing)."""

    name: Literal["accelerate", "deepspeed", "fsdp"] = "accelerate"
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    zero_stage: Literal[2, 3] = Field(2, description="deepspeed: ZeRO stage")
    offload_optimizer: bool = Field(False, description="deepspeed: optimizer state in CPU memory")
    offload_params: bool = Field(False, description="deepspeed: parameters in CPU memory (stage 3 only)")
    config: str | dict[str, Any] | None = Field(
        None, description="deepspeed: JSON file path or inline mapping deep-merged over the generated config"
    )
    fsdp_cpu_offload: bool = Field(
        False, description="fsdp: sharded parameters, gradients and optimizer state in CPU memory (CPUOffloadPolicy)"
    )
    fsdp_reshard_after_forward: bool = Field(
        True, description="fsdp: free the gathered parameters after each block's forward and gather them again for "
        "backward (ZeRO-3-like, least memory); false keeps them until backward (ZeRO-2-like, less communication)"
    )


class ScalingConfig(_Strict):
    num_workers: PositiveInt = 1
    use_gpu: bool | Literal["auto"] = "auto"
    resources_per_worker: dict[str, float] = Field(default_factory=lambda: {"CPU": 1})
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"


class BestConfig(_Strict):
    """An eval metric and which way is better: what `output.publish: best` ranks checkpoints by
    (and, with patience, what early stopping watches; raylib/best.py)."""

    metric: str = Field("eval_loss", description="an eval metric of the objective (eval_loss, eval_token_accuracy, ...)")
    mode: Literal["min", "max"] | None = Field(None, description="default: min for losses, max otherwise")

    @model_validator(mode="after")
    def _mode(self) -> "BestConfig":
        if self.mode is None:
            self.mode = best.default_mode(self.metric)
        return self


class EarlyStoppingConfig(BestConfig):
    """Stop when the eval metric has not improved for `patience` evals."""

    patience: PositiveInt = Field(3, description="evals without improvement before the run stops")
    min_delta: float = Field(0.0, ge=0, description="an improvement must exceed this")


class TrainConfig(_Strict):
    lr: float = Field(2e-4, gt=0)
    epochs: PositiveInt = 1
    max_steps: PositiveInt | None = Field(None, description="optimizer steps; overrides epochs")
    batch_size: PositiveInt = Field(8, description="sequences per worker per micro-batch")
    grad_accum: PositiveInt = 1
    seed: int = 0
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "sgd"] | None = None
    weight_decay: float = Field(0.0, ge=0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    gradient_checkpointing: bool = False
    checkpoint_every: int = Field(50, ge=0, description="steps between checkpoints; 0 = only at the end")
    keep_checkpoints: PositiveInt = 2
    eval_every: int | None = Field(None, ge=0, description="steps between evals; default checkpoint_every")
    log_every: PositiveInt = 1
    max_failures: int = Field(0, ge=-1, description="worker-failure restarts (Ray FailureConfig)")
    early_stopping: EarlyStoppingConfig | None = Field(None, description="stop when an eval metric stops improving")


class WandbConfig(_Strict):
    """Weights & Biases, when output.tracking lists wandb (raylib/tracking.py)."""

    project: str | None = Field(None, description="default: output.experiment, else 'raylib'")
    entity: str | None = None
    mode: Literal["online", "offline"] | None = Field(None, description="default: $WANDB_MODE, else online")


class OutputConfig(_Strict):
    dir: str = Field(description="run directory: final expert at its root, checkpoints/ inside")
    experiment: str | None = None
    domain: str | None = Field(None, description="domain label written to expert.json")
    tracking: list[Literal["mlflow", "tensorboard", "wandb"]] = Field(
        default_factory=list, description="metric trackers: mlflow (file store under dir/mlruns), tensorboard, wandb")
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    mlflow_uri: str | None = Field(None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI, else dir/mlruns")
    publish: Literal["last", "best"] = Field("last", description="the expert published at dir: the last checkpoint's, "
                                             "or the best by output.best (default: the early-stopping metric, else eval_loss)")
    best: BestConfig | None = Field(None, description="the metric `publish: best` picks by")


MethodConfig = Annotated[Union[tuple(m.Options for m in METHODS.values())], Field(discriminator="name")]


class JobConfig(_Strict):
    provider: Literal["ray", "openai"] = Field("ray", description="ray: raylib's Ray Train run; openai: an "
                                               "OpenAI-compatible fine-tuning API (raylib/providers.py)")
    provider_options: ProviderOptions | None = None
    model: ModelConfig
    data: DataConfig
    method: MethodConfig
    objective: ObjectiveOptions = Field(default_factory=SFTOptions)
    backend: BackendConfig = Field(default_factory=BackendConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    output: OutputConfig

    @model_validator(mode="after")
    def _method_defaults(self) -> "JobConfig":
        method = METHODS[self.method.name]
        if method.quantization and self.model.quantization is None:
            self.model.quantization = method.quantization
        if self.train.optimizer is None:
            self.train.optimizer = method.default_optimizer
        if not method.supports_packing and "packing" not in self.data.model_fields_set:
            self.data.packing = False
        if method.default_lr is not None and "lr" not in self.train.model_fields_set:
            self.train.lr = method.default_lr
        return self

    @property
    def run_name(self) -> str:
        return self.output.experiment or os.path.basename(os.path.normpath(self.output.dir))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# --------------------------------------------------------------------------- loading


def load_job(path: str | os.PathLike, overrides: list[str] | None = None) -> JobConfig:
    """Read a job YAML, apply `key.path=value` overrides, validate. Raises ConfigError."""
    raw = read_yaml(path)
    for item in overrides or []:
        apply_override(raw, item)
    return validate_job(raw, source=str(path))


def read_yaml(path: str | os.PathLike, what: str = "job file", kind: str = "job",
              sections: str = "of sections (model, data, method, ...)") -> dict[str, Any]:
    """A YAML mapping from `path` (job files here; serve configs reuse it), or a ConfigError."""
    if not os.path.isfile(path):
        raise ConfigError("", f"{what} {str(path)!r} does not exist", f"pass the path of a {kind} YAML")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{path} is not valid YAML: {exc}".replace("\n", " ")) from exc
    if not isinstance(raw, dict):
        raise ConfigError("", f"{path} must be a YAML mapping {sections}")
    return raw


def apply_override(raw: dict[str, Any], item: str) -> None:
    """`train.lr=1e-4` -> raw["train"]["lr"] = 1e-4 (value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError("--set", f"{item!r} is not KEY=VALUE", "write e.g. --set train.lr=1e-4")
    key, value = item.split("=", 1)
    set_field(raw, key.strip(), yaml.safe_load(value))


def set_field(raw: dict[str, Any], path: str, value: Any) -> None:
    """raw["train"]["lr"] = value for path "train.lr" (creating sections on the way)."""
    parts = path.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(path, f"cannot set a field inside {part!r}, which is not a section")
    node[parts[-1]] = value


def validate_job(raw: dict[str, Any], source: str = "job") -> JobConfig:
    try:
        job = JobConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError("", f"{source}: " + "; ".join(_describe(e) for e in exc.errors())) from None
    METHODS[job.method.name].check(job)
    providers.check(job)
    if job.provider != "ray":  # the other checks are about the Ray run, which does not happen
        return job
    backends.check(job)
    check_objective(job)
    best.check(job)
    _check_data(job)
    return job


def _check_data(job: JobConfig) -> None:
    d = job.data
    if d.format in ("messages", "sharegpt", "turns") and d.template != "chat":
        raise ConfigError("data.format", f"{d.format} rows are conversations, rendered with the tokenizer's chat "
                          f"template, but data.template is {d.template!r}", "set data.template: chat")


# --------------------------------------------------------------------------- error text

_SECTIONS_WITH_TAGS = {
    "method": {m.name: m.Options for m in METHODS.values()},
    "objective": {get_args(o.model_fields["name"].annotation)[0]: o for o in OBJECTIVE_OPTIONS},
}


def _describe(err: dict[str, Any]) -> str:
    loc = [str(p) for p in err["loc"]]
    # a discriminated union puts the tag into the location: method.lora.r -> method.r
    if len(loc) > 1 and loc[0] in _SECTIONS_WITH_TAGS and loc[1] in _SECTIONS_WITH_TAGS[loc[0]]:
        loc = [loc[0], *loc[2:]]
    field = ".".join(loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        valid = _valid_fields(err["loc"][:-1])
        close = difflib.get_close_matches(loc[-1], valid, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"valid fields: {', '.join(valid)}"
        return f"{field}: unknown field ({hint})"
    if kind == "missing":
        return f"{field}: required field is missing"
    if kind == "union_tag_invalid":
        names = sorted(_SECTIONS_WITH_TAGS.get(loc[0], {}))
        got = err.get("input", {}).get("name") if isinstance(err.get("input"), dict) else None
        close = difflib.get_close_matches(str(got), names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{field}.name: unknown {loc[0]} {got!r}{hint}; choose one of {', '.join(names)}"
    if kind == "union_tag_not_found":
        names = sorted(_SECTIONS_WITH_TAGS.get(loc[0], {}))
        return f"{field}.name: required; choose one of {', '.join(names)}"
    return f"{field}: {err['msg']} (got {err.get('input')!r})"


def _valid_fields(loc: tuple) -> list[str]:
    """Field names of the model at `loc` (walking nested models and method tags)."""
    model: Any = JobConfig
    for part in loc:
        if isinstance(part, int):
            continue
        section = _SECTIONS_WITH_TAGS.get(part) if model is JobConfig else None
        if section is not None:
            model = section
            continue
        if isinstance(model, dict):
            model = model.get(part, {})
            continue
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            return []
        model = _model_of(field.annotation)
    if isinstance(model, dict):  # a tagged section with no tag given
        return sorted({f for m in model.values() for f in m.model_fields})
    return sorted(model.model_fields) if hasattr(model, "model_fields") else []


def _model_of(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation) if get_origin(annotation) is not None else ():
        found = _model_of(arg)
        if found is not None:
            return found
    return None
