"""Cluster-side entry of `raylib submit`: the job YAML arrives in an env var.

    python -m raylib.job_entry --job-env RAYLIB_JOB_YAML [--set k=v] [--resume]

writes $RAYLIB_JOB_YAML to `raylib-job.yaml` in the job's working directory and runs
`raylib train` on it (jobs/finetune.py does the same from a source checkout).
"""

from __future__ import annotations

import os
import sys


def argv_with_job_file(argv: list[str]) -> list[str]:
    """`--job-env VAR rest...` -> `<file with $VAR> rest...` (other argv unchanged)."""
    if len(argv) >= 2 and argv[0] == "--job-env":
        text = os.environ.get(argv[1])
        if not text:
            sys.exit(f"error: --job-env {argv[1]}: the variable is empty or not set")
        path = os.path.abspath("raylib-job.yaml")
        with open(path, "w") as f:
            f.write(text)
        return [path, *argv[2:]]
    return argv


def main() -> None:
    from raylib.cli import main as cli

    cli(["train", *argv_with_job_file(sys.argv[1:])], prog_name="raylib.job_entry")


if __name__ == "__main__":
    main()
