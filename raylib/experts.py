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
