"""The expert contract: what a trained expert is on disk.

An expert is a directory holding `expert.json` plus its weights in the method's ecosystem
format (a PEFT adapter, a full HF model, SVF z-vectors). `expert.json` is written last, so
a directory with it is complete; the serve layer and `raylib eval` read only this contract.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import raylib

EXPERT_FILE = "expert.json"
FORMAT = "raylib.expert/1"


@dataclass
class ExpertInfo:
    method: str
    base_model: str
    domain: str | None = None
    template: str = "alpaca"
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    step: int | None = None
    family: str = "causal"  # the base model's family: causal | seq2seq | encoder (models.family)
    provider: str = "ray"  # openai: trained by a fine-tuning API, which holds the model (fine_tuned_model)
    fine_tuned_model: str | None = None
    created_at: float = field(default_factory=time.time)
    raylib_version: str = raylib.__version__
    format: str = FORMAT


def write_expert_json(out_dir: str, info: ExpertInfo) -> str:
    path = os.path.join(out_dir, EXPERT_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(info.__dict__, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)
    return path


def read_expert(path: str) -> ExpertInfo:
    file = os.path.join(path, EXPERT_FILE)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path} is not a raylib expert (no {EXPERT_FILE})")
    with open(file) as f:
        raw = json.load(f)
    known = ExpertInfo.__dataclass_fields__
    return ExpertInfo(**{k: v for k, v in raw.items() if k in known})


def is_expert(path: str) -> bool:
    return os.path.isfile(os.path.join(path, EXPERT_FILE))


def cache_root() -> str:
    return os.environ.get("RAYLIB_EXPERT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "raylib", "experts")


def resolve_expert(uri_or_path: str, field: str = "expert") -> str:
    """An expert given as a local path or a URI (s3://, gs://, any pyarrow/fsspec scheme) ->
    a local directory holding it.

    Remote experts are downloaded once into `cache_root()/<hash of the URI>` and reused
    while their `expert.json` is unchanged (a retrained expert has a new one, so it is
    fetched again). The download goes to a temporary sibling and is renamed into place, so
    concurrent callers (several actors on one node) never see half an expert.
    Raises ConfigError when the location holds no expert.
    """
    import hashlib
    import shutil
    import tempfile

    from raylib import storage
    from raylib.errors import ConfigError

    if not storage.is_uri(uri_or_path):
        return os.path.abspath(os.path.expanduser(uri_or_path.removeprefix("file://")))
    loc = storage.resolve(uri_or_path, field)
    try:
        manifest = storage.read_text(loc, EXPERT_FILE)
    except FileNotFoundError:
        raise ConfigError(field, f"{uri_or_path} is not a raylib expert (no {EXPERT_FILE})",
                          "point at a run's output.dir (or a composed expert) that finished") from None
    except Exception as exc:
        raise ConfigError(field, f"cannot read {uri_or_path}/{EXPERT_FILE}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}",
                          "check the URI and the credentials in the environment") from None
    dest = os.path.join(cache_root(), hashlib.sha1(loc.uri.encode()).hexdigest()[:20])
    cached = os.path.join(dest, EXPERT_FILE)
    if os.path.isfile(cached) and open(cached).read() == manifest:
        return dest
    os.makedirs(cache_root(), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".download-", dir=cache_root())
    try:
        storage.download_dir(loc, tmp, exclude=("checkpoints",))  # a run's output.dir also holds its checkpoints
        with open(os.path.join(tmp, EXPERT_FILE), "w") as f:  # the manifest we checked, even if it changed meanwhile
            f.write(manifest)
        old = dest + f".old-{os.getpid()}"
        if os.path.exists(dest):
            os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
