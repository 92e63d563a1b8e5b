"""Small synthetic multi-domain task sets, generated locally (no dataset hub).

Three domains a tiny model can learn in seconds, each with a checkable exact answer:

- arithmetic: "What is 23 + 45?" -> "68"
- strings:    "Reverse the word: lamp" -> "pmal", "Uppercase the word: lamp" -> "LAMP"
- comparison: "Which is larger: 37 or 52?" -> "52"

Rows use the instruction/input/output columns of the seeds' instruction template plus a
`domain` column, so the same files serve SFT, classification (route by domain) and RL
(reward = exact match against `output`).
"""

from __future__ import annotations

import json
import os
import random
import zlib
from typing import Callable, Iterable, Literal

_WORDS = (
    "lamp river stone cloud apple tiger bread chair glass light mouse paper piano plant "
    "queen robot sugar table train water zebra ocean maple frost ember cedar delta"
).split()


def _arithmetic(rng: random.Random) -> dict:
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    if rng.random() < 0.5:
        return {"instruction": f"What is {a} + {b}?", "input": "", "output": str(a + b)}
    a, b = max(a, b), min(a, b)
    return {"instruction": f"What is {a} - {b}?", "input": "", "output": str(a - b)}


def _strings(rng: random.Random) -> dict:
    word = rng.choice(_WORDS)
    if rng.random() < 0.5:
        return {"instruction": "Reverse the word.", "input": word, "output": word[::-1]}
    return {"instruction": "Uppercase the word.", "input": word, "output": word.upper()}


def _comparison(rng: random.Random) -> dict:
    a, b = rng.sample(range(0, 100), 2)
    if rng.random() < 0.5:
        return {"instruction": f"Which is larger: {a} or {b}?", "input": "", "output": str(max(a, b))}
    return {"instruction": f"Which is smaller: {a} or {b}?", "input": "", "output": str(min(a, b))}


DOMAINS: dict[str, Callable[[random.Random], dict]] = {
    "arithmetic": _arithmetic,
    "strings": _strings,
    "comparison": _comparison,
}


def swapped_answer(row: dict) -> str:
    """The answer of the row's domain's other operation: reverse <-> uppercase, larger <->
    smaller, + <-> - (|a - b|). The instruct base's template habit (`tiny_models.INSTRUCT_TINY`)."""
    text, word = row["instruction"], row["input"]
    if text.startswith("Reverse"):
        return word.upper()
    if text.startswith("Uppercase"):
        return word[::-1]
    numbers = [int(t) for t in text.replace("?", " ").replace(":", " ").split() if t.isdigit()]
    a, b = numbers
    if "larger" in text:
        return str(min(a, b))
    if "smaller" in text:
        return str(max(a, b))
    return str(abs(a - b)) if " + " in text else str(a + b)


def in_test_split(row: dict) -> bool:
    """A fixed fifth of each domain's prompts (by a hash) is the test split: with `split=`,
    train rows never ask what a test row asks (strings has only 52 prompts, so draws from
    disjoint seeds alone would repeat them). Strings split by word, not by prompt: with
    "reverse lamp" in train and "uppercase lamp" in test, a model learns which operation
    goes with which word instead of reading the instruction."""
    key = row["input"] or row["instruction"]
    return zlib.crc32(key.encode()) % 5 == 0


def make_rows(n: int, domains: Iterable[str] | None = None, seed: int = 0,
              split: Literal["train", "test"] | None = None) -> list[dict]:
    """`n` rows drawn round-robin from `domains` (all by default), deterministic in `seed`;
    with `split`, only prompts of that side of `in_test_split`."""
    names = list(domains or DOMAINS)
    unknown = [d for d in names if d not in DOMAINS]
    if unknown:
        raise ValueError(f"unknown synthetic domains {unknown}; choose from {sorted(DOMAINS)}")
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        domain = names[i % len(names)]
        row = DOMAINS[domain](rng)
        while split is not None and in_test_split(row) != (split == "test"):
            row = DOMAINS[domain](rng)
        rows.append({**row, "domain": domain})
    rng.shuffle(rows)
    return rows


def write_jsonl(rows: Iterable[dict], path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
    return path


def write_dataset(
    out_dir: str, n_train: int = 2000, n_eval: int = 200, domains: Iterable[str] | None = None, seed: int = 0,
    held_out: bool = False, pairs: bool = False,
) -> dict[str, str]:
    """Write train.jsonl and eval.jsonl (disjoint seeds) under `out_dir`; return their paths.
    `held_out`: eval asks only test-split prompts, train none of them (`in_test_split`).
    `pairs`: rows also carry `chosen`/`rejected` answers (`make_preference_rows`)."""
    domains = list(domains or DOMAINS)
    train, test = ("train", "test") if held_out else (None, None)
    make = make_preference_rows if pairs else make_rows
    return {
        "train": write_jsonl(make(n_train, domains, seed, train), os.path.join(out_dir, "train.jsonl")),
        "eval": write_jsonl(make(n_eval, domains, seed + 10_000, test), os.path.join(out_dir, "eval.jsonl")),
    }


def make_preference_rows(n: int, domains: Iterable[str] | None = None, seed: int = 0,
                         split: Literal["train", "test"] | None = None) -> list[dict]:
    """`make_rows` as preference pairs: chosen = the right answer, rejected = the answer of the
    domain's other operation (`swapped_answer`, the mistake a half-trained model makes)."""
    return [{**row, "chosen": row["output"], "rejected": swapped_answer(row)}
            for row in make_rows(n, domains, seed, split)]


def tokenizer_corpus(n: int = 3000, seed: int = 0) -> list[str]:
    """Text to train the tiny tokenizer on: the tasks in the prompt templates raylib uses."""
    from raylib.data import ALPACA  # the template text must be cheap to tokenize

    texts = []
    for row in make_rows(n, seed=seed):
        texts.append(ALPACA.prompt(row["instruction"], row["input"]) + row["output"] + ALPACA.end)
        texts.append(f"{row['instruction']} {row['input']} {row['output']}")
    texts.extend(["Classify the request into one of: arithmetic, strings, comparison, other."] * 10)
    return texts


# --------------------------------------------------------------------------- classification

#: two tasks over the same rows, for `method: heads` (one backbone, two heads)
CLASSIFICATION_TASKS: dict[str, list[str]] = {
    "domain": list(DOMAINS),
    "operation": ["add", "subtract", "larger", "smaller", "reverse", "uppercase"],
}


def _operation(row: dict) -> str:
    text = row["instruction"]
    for key, label in ((" + ", "add"), (" - ", "subtract"), ("larger", "larger"), ("smaller", "smaller"),
                       ("Reverse", "reverse"), ("Uppercase", "uppercase")):
        if key in text:
            return label
    raise ValueError(f"no operation in {text!r}")


def make_classification_rows(n: int, tasks: Iterable[str] | None = None, seed: int = 0) -> list[dict]:
    """`n` rows {"text", "task", "label"}, tasks round-robin: `domain` (which of the three
    synthetic domains the request is from) and `operation` (which of six operations it asks
    for). Both are readable from the text, so a frozen tiny model's features separate them."""
    names = list(tasks or CLASSIFICATION_TASKS)
    unknown = [t for t in names if t not in CLASSIFICATION_TASKS]
    if unknown:
        raise ValueError(f"unknown classification tasks {unknown}; choose from {sorted(CLASSIFICATION_TASKS)}")
    out = []
    for i, row in enumerate(make_rows(n, seed=seed)):
        task = names[i % len(names)]
        label = row["domain"] if task == "domain" else _operation(row)
        out.append({"text": f"{row['instruction']} {row['input']}".strip(), "task": task, "label": label})
    return out


def write_classification_dataset(
    out_dir: str, n_train: int = 1000, n_eval: int = 200, tasks: Iterable[str] | None = None, seed: int = 0
) -> dict[str, str]:
    """train.jsonl / eval.jsonl of classification rows under `out_dir` (disjoint seeds)."""
    return {
        "train": write_jsonl(make_classification_rows(n_train, tasks, seed), os.path.join(out_dir, "train.jsonl")),
        "eval": write_jsonl(make_classification_rows(n_eval, tasks, seed + 10_000), os.path.join(out_dir, "eval.jsonl")),
    }
