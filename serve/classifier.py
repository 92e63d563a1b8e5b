"""A small prompt -> domain classifier that raylib trains on labelled prompts (router strategy
`classifier`).

Features are hashed word unigrams/bigrams and character 3-grams (no vocabulary to ship, any
language); the model is one linear layer + softmax trained with AdamW in torch. Training on a
few thousand prompts takes seconds on a CPU, so the router trains it at start-up when
`router.classifier_data` is given and `router.classifier` does not exist yet. On disk:
`classifier.safetensors` (weight, bias) + `classifier.json` (labels, feature size, metrics).
"""

from __future__ import annotations

import json
import os
import re
import zlib
from typing import Sequence

WEIGHTS, META = "classifier.safetensors", "classifier.json"
_WORD = re.compile(r"[a-z]+|\d|[^\sa-z\d]")


def features(texts: Sequence[str], dim: int):
    """A [N, dim] tensor of hashed n-gram counts (log-scaled)."""
    import torch

    x = torch.zeros(len(texts), dim)
    for i, text in enumerate(texts):
        low = text.lower()
        words = _WORD.findall(low)
        grams = [f"w:{w}" for w in words] + [f"b:{a} {b}" for a, b in zip(words, words[1:])]
        grams += [f"c:{low[j:j + 3]}" for j in range(max(0, len(low) - 2))]
        for g in grams:
            x[i, zlib.crc32(g.encode()) % dim] += 1.0
    return torch.log1p(x)


def row_text(row: dict) -> str:
    return " ".join(str(row.get(k) or "") for k in ("instruction", "input", "text", "prompt")).strip()


def train_classifier(rows: Sequence[dict], out_dir: str, label_field: str = "domain", dim: int = 4096,
                     epochs: int = 30, lr: float = 0.05, seed: int = 0) -> dict:
    """Train on rows with text (instruction/input/text/prompt) and `label_field`; write it."""
    import torch
    from safetensors.torch import save_file

    texts = [row_text(r) for r in rows]
    labels = sorted({str(r[label_field]) for r in rows})
    if len(labels) < 2:
        raise ValueError(f"need at least two labels in {label_field!r}, got {labels}")
    y = torch.tensor([labels.index(str(r[label_field])) for r in rows])
    x = features(texts, dim)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(rows), generator=g)
    n_eval = max(1, len(rows) // 10)
    ev, tr = perm[:n_eval], perm[n_eval:]
    torch.manual_seed(seed)
    lin = torch.nn.Linear(dim, len(labels))
    opt = torch.optim.AdamW(lin.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(epochs):
        for chunk in tr[torch.randperm(len(tr), generator=g)].split(64):
            loss = torch.nn.functional.cross_entropy(lin(x[chunk]), y[chunk])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = (lin(x[ev]).argmax(-1) == y[ev]).float().mean().item()
    os.makedirs(out_dir, exist_ok=True)
    save_file({"weight": lin.weight.detach().contiguous(), "bias": lin.bias.detach().contiguous()},
              os.path.join(out_dir, WEIGHTS))
    meta = {"labels": labels, "dim": dim, "label_field": label_field, "eval_accuracy": acc, "rows": len(rows)}
    with open(os.path.join(out_dir, META), "w") as f:
        json.dump(meta, f, indent=2)
    return meta


class Classifier:
    def __init__(self, path: str):
        from safetensors.torch import load_file

        with open(os.path.join(path, META)) as f:
            self.meta = json.load(f)
        w = load_file(os.path.join(path, WEIGHTS))
        self.weight, self.bias = w["weight"], w["bias"]
        self.labels: list[str] = self.meta["labels"]

    def predict(self, text: str) -> tuple[str, float]:
        import torch

        with torch.no_grad():
            p = torch.softmax(features([text], self.meta["dim"]) @ self.weight.T + self.bias, -1)[0]
        i = int(p.argmax())
        return self.labels[i], float(p[i])


def ensure_classifier(path: str | None, data: str | None, label_field: str = "domain") -> str:
    """The classifier dir; trained from `data` (jsonl) first when it does not exist yet."""
    from filelock import FileLock

    if path is None:
        import hashlib

        key = hashlib.sha1(f"{os.path.abspath(data)}:{os.path.getmtime(data)}:{label_field}".encode()).hexdigest()[:16]
        path = os.path.join(os.path.expanduser("~/.cache/raylib/router-classifiers"), key)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with FileLock(os.path.abspath(path) + ".lock"):
        if not os.path.isfile(os.path.join(path, META)):
            if not data:
                raise FileNotFoundError(f"no classifier at {path} and no data to train one")
            with open(data) as f:
                rows = [json.loads(line) for line in f if line.strip()]
            train_classifier(rows, path, label_field)
    return path
