"""Reward functions for the RL objectives, pluggable by name or `module:function`.

A reward function is `fn(completion: str, row: dict) -> float`: `completion` is the model's
answer (cut at the template's end marker), `row` the data row (its `output` column is the
reference answer; other columns, e.g. `tests` for code, are available too).

Built in (`objective.reward`):

- `exact_match`: 1.0 if the final answer equals the reference exactly (stripped);
- `contains`:    1.0 if the reference occurs in the completion (seed 000's target presence);
- `numeric`:     1.0 if the first number in the completion equals the reference number
                 (within 1e-6 relative), else 0.0;
- `model:<dir>`: a reward model trained by raylib (`objective: {name: reward}`) scores the
                 prompt and completion (objectives/preference.py `RewardModelScorer`);
- `code_tests`:  runs the completion as Python followed by `row["tests"]` (asserts) in a
                 separate `python -I` subprocess with a timeout, no network (network
                 syscalls are blocked by replacing `socket.socket` before the code runs,
                 proxies unset) and a scratch cwd; 1.0 if it exits 0. Never exec'd here.

A reward function that raises fails the run: `RewardError` names the function, the row and
the exception, and the CLI exits non-zero.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from typing import Callable

from raylib.errors import ConfigError, RaylibError

RewardFn = Callable[[str, dict], float]


class RewardError(RaylibError):
    """A reward function raised or returned a non-number: the run stops."""


def exact_match(completion: str, row: dict) -> float:
    from raylib.evaluation import final_answer

    return float(final_answer(completion) == str(row["output"]).strip())


def contains(completion: str, row: dict) -> float:
    return float(str(row["output"]).strip() in completion)


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def numeric(completion: str, row: dict) -> float:
    got = _NUMBER.search(completion)
    want = _NUMBER.search(str(row["output"]))
    if got is None or want is None:
        return 0.0
    a, b = float(got.group()), float(want.group())
    return float(abs(a - b) <= 1e-6 * max(1.0, abs(b)))


_SANDBOX_PRELUDE = """
import socket as _s, os as _o
def _no_net(*a, **k):
    raise OSError("network access is disabled in raylib code rewards")
_s.socket = _no_net
_s.create_connection = _no_net
_s.getaddrinfo = _no_net
for _k in list(_o.environ):
    if 'proxy' in _k.lower():
        del _o.environ[_k]
del _s, _o, _k
"""


def run_code_tests(code: str, tests: str, timeout: float = 10.0) -> tuple[bool, str]:
    """Run `code` + `tests` in a fresh isolated interpreter; (passed, stderr tail)."""
    with tempfile.TemporaryDirectory(prefix="raylib-code-") as tmp:
        path = os.path.join(tmp, "candidate.py")
        with open(path, "w") as f:
            f.write(_SANDBOX_PRELUDE + "\n" + code + "\n\n" + tests + "\n")
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "PYTHONDONTWRITEBYTECODE": "1", "no_proxy": "*"}
        try:
            proc = subprocess.run([sys.executable, "-I", path], cwd=tmp, env=env, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            return False, f"timed out after {timeout}s"
        return proc.returncode == 0, proc.stderr[-500:]


def code_tests(completion: str, row: dict) -> float:
    tests = row.get("tests")
    if not tests:
        raise ValueError("code_tests needs a 'tests' column with Python asserts")
    code = completion
    fence = re.search(r"```(?:python)?\n(.*?)```", completion, re.S)
    if fence:
        code = fence.group(1)
    ok, _ = run_code_tests(code, tests, float(row.get("timeout", 10.0)))
    return float(ok)


BUILTIN: dict[str, RewardFn] = {
    "exact_match": exact_match,
    "contains": contains,
    "numeric": numeric,
    "code_tests": code_tests,
}


def resolve(spec: str) -> RewardFn:
    """A built-in name, `model:<reward expert dir>` or `package.module:function`. Raises ConfigError."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    if spec.startswith("model:"):
        from raylib.objectives.preference import RewardModelScorer

        path = spec[len("model:"):]
        if not os.path.isfile(os.path.join(path, "expert.json")):
            raise ConfigError("objective.reward", f"{path!r} is not a raylib expert (no expert.json)",
                              "point model: at the output.dir of an objective: {name: reward} run")
        return RewardModelScorer(path)
    if ":" not in spec:
        raise ConfigError("objective.reward", f"unknown reward {spec!r}",
                          f"use one of {', '.join(BUILTIN)} or a 'module:function' path")
    from raylib.objectives import import_function

    return import_function(spec, "objective.reward")


def score(fn: RewardFn, name: str, completions: list[str], rows: list[dict]) -> list[float]:
    """Rewards for completions; any failure becomes a RewardError naming the function. A
    scorer with `score_batch` (a reward model) scores them in one forward."""
    if hasattr(fn, "score_batch"):
        try:
            return [float(v) for v in fn.score_batch(completions, rows)]
        except Exception as exc:
            raise RewardError(f"reward {name!r} raised {type(exc).__name__}: {exc}") from exc
    out = []
    for completion, row in zip(completions, rows):
        try:
            value = float(fn(completion, row))
        except Exception as exc:
            raise RewardError(
                f"reward function {name!r} raised {type(exc).__name__}: {exc} "
                f"(on completion {completion[:80]!r} for row {str(row)[:120]})"
            ) from exc
        if value != value:
            raise RewardError(f"reward function {name!r} returned NaN for completion {completion[:80]!r}")
        out.append(value)
    return out
