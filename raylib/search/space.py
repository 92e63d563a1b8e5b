"""The search file of `raylib tune`: a search space over job fields, validated up front.

    space:
      train.lr: loguniform [1e-5, 1e-3]     # or {loguniform: [1e-5, 1e-3]}
      method.r: choice [4, 8, 16]
    metric: eval_loss
    mode: min
    num_samples: 8
    max_concurrent: 2
    algorithm: random                       # random | grid | optuna
    scheduler: {name: asha, grace_period: 4, reduction_factor: 2}

Every path must name a field of the base job (for `method.*`, of the job's own method),
and every value the space can produce must make a valid job: both are checked against
the job schema before Ray starts, so a typo costs an error line, not a cluster.
"""

from __future__ import annotations

import copy
import difflib
import os
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator

from raylib.config import JobConfig, _model_of, read_yaml, set_field, validate_job
from raylib.errors import ConfigError

DISTRIBUTIONS = {
    "uniform": 2,      # [low, high]
    "loguniform": 2,   # [low, high]
    "quniform": 3,     # [low, high, q]
    "randint": 2,      # [low, high) as Ray's tune.randint
    "choice": None,    # [a, b, ...]
    "grid": None,      # [a, b, ...]: every value, in order (tune.grid_search)
}


class Dimension(BaseModel):
    """One searched field: a distribution name and its arguments."""

    kind: str
    args: list[Any]

    def sample_values(self) -> list[Any]:
        """Values that bound what this dimension can produce (checked against the schema)."""
        if self.kind in ("choice", "grid"):
            return list(self.args)
        if self.kind == "randint":
            return [self.args[0], self.args[1] - 1]
        return [self.args[0], self.args[1]]

    def to_tune(self):
        from ray import tune

        a = self.args
        return {
            "uniform": lambda: tune.uniform(a[0], a[1]),
            "loguniform": lambda: tune.loguniform(a[0], a[1]),
            "quniform": lambda: tune.quniform(a[0], a[1], a[2]),
            "randint": lambda: tune.randint(a[0], a[1]),
            "choice": lambda: tune.choice(a),
            "grid": lambda: tune.grid_search(a),
        }[self.kind]()


class SchedulerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["asha", "none"] = "asha"
    grace_period: PositiveInt | None = Field(None, description="steps before a trial may be stopped; default: first eval")
    reduction_factor: float = Field(2, gt=1)
    max_t: PositiveInt | None = Field(None, description="steps; default the job's train.max_steps")


class SearchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    space: dict[str, Dimension]
    metric: str = "eval_loss"
    mode: Literal["min", "max"] = "min"
    num_samples: PositiveInt | None = Field(None, description="trials; default 4 (random/optuna), 1 pass over the grid (grid)")
    max_concurrent: PositiveInt | None = None
    algorithm: Literal["random", "grid", "optuna"] = "random"
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    seed: int | None = 0
    dir: str | None = Field(None, description="where the search lives; default <job output.dir>-search")
    max_failures: int = Field(0, ge=0, description="retries of a failed trial")

    @field_validator("space", mode="before")
    @classmethod
    def _parse_space(cls, raw: Any) -> dict[str, Dimension]:
        if not isinstance(raw, dict) or not raw:
            raise ValueError("must map job field paths to distributions, e.g. {train.lr: loguniform [1e-5, 1e-3]}")
        return {path: _parse_dimension(path, spec) for path, spec in raw.items()}


def _parse_dimension(path: str, spec: Any) -> Dimension:
    if isinstance(spec, Dimension):
        return spec
    if isinstance(spec, str):  # "loguniform [1e-5, 1e-3]"
        kind, _, rest = spec.strip().partition(" ")
        try:
            args = yaml.safe_load(rest) if rest.strip() else None
        except yaml.YAMLError:
            args = None
    elif isinstance(spec, dict) and len(spec) == 1:  # {loguniform: [1e-5, 1e-3]}
        kind, args = next(iter(spec.items()))
    else:
        kind, args = None, None
    if kind not in DISTRIBUTIONS or not isinstance(args, list) or not args:
        raise ValueError(
            f"{path}: {spec!r} is not a distribution; write e.g. 'loguniform [1e-5, 1e-3]' or 'choice [4, 8]' "
            f"(one of {', '.join(DISTRIBUTIONS)})"
        )
    arity = DISTRIBUTIONS[kind]
    if arity is not None:  # YAML reads 1e-3 (no dot) as a string: ranges are numbers
        try:
            args = [a if isinstance(a, (int, float)) else float(a) for a in args]
        except (TypeError, ValueError):
            raise ValueError(f"{path}: {kind} takes numbers, got {args!r}") from None
    if arity is not None and len(args) != arity:
        raise ValueError(f"{path}: {kind} takes {arity} numbers, got {args!r}")
    if arity is not None and not args[0] < args[1]:
        raise ValueError(f"{path}: {kind} needs low < high, got {args!r}")
    if kind == "loguniform" and args[0] <= 0:
        raise ValueError(f"{path}: loguniform needs low > 0, got {args!r}")
    return Dimension(kind=kind, args=args)


# --------------------------------------------------------------------------- loading


def load_search(path: str | os.PathLike, job: JobConfig, raw_job: dict[str, Any]) -> SearchConfig:
    """Read and validate a search file against the base job. Raises ConfigError."""
    raw = read_yaml(path)
    try:
        search = SearchConfig.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"search.{loc}: unknown field" if err["type"] == "extra_forbidden" else f"search.{loc}: {msg}")
        raise ConfigError("", f"{path}: " + "; ".join(problems)) from None
    if search.algorithm == "grid":
        ranged = [p for p, d in search.space.items() if d.kind not in ("choice", "grid")]
        if ranged:
            raise ConfigError(f"search.space.{ranged[0]}", "algorithm grid needs listed values", "use 'grid [a, b]' or 'choice [a, b]'")
    if search.algorithm == "optuna" and any(d.kind == "grid" for d in search.space.values()):
        raise ConfigError("search.algorithm", "optuna cannot sample grid dimensions", "use choice [...] with optuna")
    for field_path, dim in search.space.items():
        check_path(job, field_path)
        for value in dim.sample_values():
            trial = copy.deepcopy(raw_job)
            set_field(trial, field_path, value)
            validate_job(trial, source=f"search.space.{field_path}={value!r} makes an invalid job")
    return search


def check_path(job: JobConfig, path: str) -> None:
    """`path` must name a field of `job` (for method.*, of the job's own method)."""
    parts = path.split(".")
    model: Any = JobConfig
    for i, part in enumerate(parts):
        fields = model.model_fields if hasattr(model, "model_fields") else None
        if fields is None:  # a free-form mapping (resources_per_worker, extra): any key
            return
        if part not in fields:
            where = ".".join(parts[:i]) or "the job"
            close = difflib.get_close_matches(part, list(fields), n=1)
            hint = f"did you mean {'.'.join([*parts[:i], close[0]])!r}?" if close else f"fields of {where}: {', '.join(fields)}"
            raise ConfigError(f"search.space.{path}", f"{where} has no field {part!r}", hint)
        if model is JobConfig and part == "method":
            model = type(job.method)
        else:
            annotation = fields[part].annotation
            sub = _model_of(annotation)
            if sub is None:
                if i < len(parts) - 1 and not _is_mapping(annotation):
                    raise ConfigError(f"search.space.{path}", f"{'.'.join(parts[: i + 1])} is a value, not a section")
                return
            model = sub


def _is_mapping(annotation: Any) -> bool:
    from typing import get_origin

    return get_origin(annotation) is dict or annotation is dict
